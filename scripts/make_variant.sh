#!/usr/bin/env bash
# Write variants/NAME/: branch BRANCH's versions of the files it changed since its merge base with BASE (default: the checked
# out commit), for scripts/gpu_variants.sh. Run here, before the device call; delete variants/ afterwards.
#   scripts/make_variant.sh BRANCH [NAME] [BASE]
set -euo pipefail
cd "$(dirname "$0")/.."
BRANCH=$1; NAME=${2:-${BRANCH##*/}}; BASE=${3:-HEAD}
rm -rf "variants/$NAME"
git diff --name-only --diff-filter=AM "$BASE...$BRANCH" | while read -r f; do
  mkdir -p "variants/$NAME/$(dirname "$f")"
  git show "$BRANCH:$f" > "variants/$NAME/$f"
done
if [ -n "$(git diff --name-only --diff-filter=D "$BASE...$BRANCH")" ]; then
  echo "make_variant: $BRANCH deletes files; an overlay cannot express that" >&2; exit 1
fi
echo "variants/$NAME: $(find "variants/$NAME" -type f | wc -l) files"
