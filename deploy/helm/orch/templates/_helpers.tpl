{{/* Chart name, truncated to a DNS label. */}}
{{- define "orch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name; 40 characters leave room for the suffixes KubeRay and the Job add. */}}
{{- define "orch.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels that select this release's objects. */}}
{{- define "orch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "orch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "orch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The orch image reference. */}}
{{- define "orch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* KubeRay names the head Service <raycluster>-head-svc. */}}
{{- define "orch.headService" -}}
{{- printf "%s-head-svc" (include "orch.fullname" .) -}}
{{- end -}}

{{/* The Ray address the apply Job connects to: Ray Client on the head, since the Job pod is no Ray node. */}}
{{- define "orch.rayAddress" -}}
{{- printf "ray://%s:10001" (include "orch.headService" .) -}}
{{- end -}}

{{/* A memory_gb figure as a Kubernetes quantity: whole GiB as Gi, else MiB rounded down. */}}
{{- define "orch.memoryQuantity" -}}
{{- if eq (float64 .) (floor .) -}}{{ printf "%dGi" (int64 .) }}{{- else -}}{{ printf "%dMi" (int64 (floor (mulf . 1024))) }}{{- end -}}
{{- end -}}

{{/* Ray custom resource that pins work to the pod of a topology node. */}}
{{- define "orch.nodeResource" -}}
{{- printf "orch-node-%s" . -}}
{{- end -}}

{{/* True when a YAML number is a whole number >= 0 (YAML numbers arrive as float64 or int64). */}}
{{- define "orch.isCount" -}}
{{- if and (or (kindIs "float64" .) (kindIs "int64" .) (kindIs "int" .)) (eq (float64 .) (floor .)) (ge (float64 .) 0.0) -}}true{{- end -}}
{{- end -}}

{{/*
The topology as written to the ConfigMap (YAML text): the inline `topology` map or `topologyYaml`,
checked for what the chart needs, with the keys the chart owns rewritten.
*/}}
{{- define "orch.topology" -}}
{{- $t := dict -}}
{{- $src := "topology" -}}
{{- if .Values.topology -}}
{{- $t = deepCopy .Values.topology -}}
{{- else if .Values.topologyYaml -}}
{{- $src = "topologyYaml" -}}
{{- $t = fromYaml .Values.topologyYaml -}}
{{- if hasKey $t "Error" -}}
{{- fail (printf "topologyYaml: not a YAML mapping: %s" (get $t "Error")) -}}
{{- end -}}
{{- else -}}
{{- fail "topology: no topology given; set `topology` (a map) or `topologyYaml` (e.g. --set-file topologyYaml=cluster.yaml)" -}}
{{- end -}}
{{- $nodes := get $t "nodes" -}}
{{- if not (kindIs "slice" $nodes) -}}
{{- fail (printf "%s: nodes: the chart maps each topology node to a Ray worker group and needs a non-empty list of nodes, got %v" $src $nodes) -}}
{{- end -}}
{{- if eq (len $nodes) 0 -}}
{{- fail (printf "%s: nodes: the chart maps each topology node to a Ray worker group and needs at least one node, got an empty list" $src) -}}
{{- end -}}
{{- $seen := dict -}}
{{- range $i, $n := $nodes -}}
{{- if not (kindIs "map" $n) -}}
{{- fail (printf "%s: nodes[%d]: expected a mapping with name and gpus, got %v" $src $i $n) -}}
{{- end -}}
{{- $name := get $n "name" -}}
{{- if not (and (kindIs "string" $name) (regexMatch "^[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?$" $name)) -}}
{{- fail (printf "%s: nodes[%d].name: must be a lowercase DNS label of at most 40 characters (it names a Ray worker group), got %v" $src $i $name) -}}
{{- end -}}
{{- if hasKey $seen $name -}}
{{- fail (printf "%s: nodes[%d].name: duplicate node name %q" $src $i $name) -}}
{{- end -}}
{{- $_ := set $seen $name true -}}
{{- if not (include "orch.isCount" (get $n "gpus")) -}}
{{- fail (printf "%s: nodes[%d].gpus: must be a whole number >= 0 (the node's nvidia.com/gpu count), got %v" $src $i (get $n "gpus")) -}}
{{- end -}}
{{- $mem := get $n "memory_gb" -}}
{{- if and (hasKey $n "memory_gb") (not (and (or (kindIs "float64" $mem) (kindIs "int64" $mem) (kindIs "int" $mem)) (gt (float64 $mem) 0.0))) -}}
{{- fail (printf "%s: nodes[%d].memory_gb: must be a positive number of GiB, got %v" $src $i $mem) -}}
{{- end -}}
{{- $res := get $n "resources" | default dict -}}
{{- if not (kindIs "map" $res) -}}
{{- fail (printf "%s: nodes[%d].resources: must be a mapping of Ray custom resources, got %v" $src $i $res) -}}
{{- end -}}
{{- if and (hasKey $n "roles") (not (kindIs "slice" (get $n "roles"))) -}}
{{- fail (printf "%s: nodes[%d].roles: must be a list of roles (convert, serve), got %v" $src $i (get $n "roles")) -}}
{{- end -}}
{{- range $k, $v := $res -}}
{{- if not (regexMatch "^[-A-Za-z0-9_.:/]+$" $k) -}}
{{- fail (printf "%s: nodes[%d].resources: Ray resource name %q must be letters, digits and - _ . : /" $src $i $k) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $res (include "orch.nodeResource" $name) 1 -}}
{{- $_ := set $n "resources" $res -}}
{{- /* Pod IPs are not known ahead: the node is found by the Ray resource its pod advertises. */ -}}
{{- $_ := set $n "address" (include "orch.nodeResource" $name) -}}
{{- end -}}
{{- $serve := get $t "serve" | default dict -}}
{{- $_ := set $serve "host" "0.0.0.0" -}}
{{- $_ := set $serve "port" (int .Values.service.grpcPort) -}}
{{- $_ := set $serve "metrics_port" (int .Values.service.metricsPort) -}}
{{- $_ := set $t "serve" $serve -}}
{{- $build := get $t "build" | default dict -}}
{{- if eq .Values.artifacts.mode "uri" -}}
{{- $_ := set $build "artifacts" .Values.artifacts.uri -}}
{{- else -}}
{{- $_ := set $build "artifacts" .Values.artifacts.mountPath -}}
{{- end -}}
{{- $_ := set $t "build" $build -}}
{{- toYaml $t -}}
{{- end -}}

{{/*
Name of the topology node hosting pipeline stage 0 (the gRPC front end). Like orch's planner: the first
node that may serve (no roles, or roles including serve) with gpus > 0; on device cpu, or when no
serving node has GPUs, the first node that may serve.
*/}}
{{- define "orch.frontendNode" -}}
{{- $topo := include "orch.topology" . | fromYaml -}}
{{- $names := list -}}
{{- $firstServing := "" -}}
{{- $firstGpu := "" -}}
{{- range $topo.nodes -}}
{{- $names = append $names .name -}}
{{- $roles := .roles | default list -}}
{{- if or (not $roles) (has "serve" $roles) -}}
{{- if not $firstServing -}}{{- $firstServing = .name -}}{{- end -}}
{{- if and (not $firstGpu) (gt (int .gpus) 0) -}}{{- $firstGpu = .name -}}{{- end -}}
{{- end -}}
{{- end -}}
{{- if .Values.frontend.node -}}
{{- if not (has .Values.frontend.node $names) -}}
{{- fail (printf "frontend.node: %q is not a node of the topology (nodes: %s)" .Values.frontend.node (join ", " $names)) -}}
{{- end -}}
{{- .Values.frontend.node -}}
{{- else if and $firstGpu (ne ($topo.device | default "auto") "cpu") -}}
{{- $firstGpu -}}
{{- else -}}
{{- default (first $names) $firstServing -}}
{{- end -}}
{{- end -}}

{{/* Volumes every orch pod mounts: the topology, the artifact store, the checkpoint. */}}
{{- define "orch.volumes" -}}
- name: topology
  configMap:
    name: {{ include "orch.fullname" . }}-topology
{{- if eq .Values.artifacts.mode "emptyDir" }}
- name: artifacts
  emptyDir: {}
{{- else if eq .Values.artifacts.mode "pvc" }}
- name: artifacts
  persistentVolumeClaim:
    claimName: {{ .Values.artifacts.pvc.existingClaim | default (printf "%s-artifacts" (include "orch.fullname" .)) }}
{{- end }}
{{- if .Values.modelStorage.existingClaim }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.modelStorage.existingClaim }}
    readOnly: true
{{- end }}
{{- end -}}

{{- define "orch.volumeMounts" -}}
- name: topology
  mountPath: /etc/orch
  readOnly: true
{{- if ne .Values.artifacts.mode "uri" }}
- name: artifacts
  mountPath: {{ .Values.artifacts.mountPath }}
{{- end }}
{{- if .Values.modelStorage.existingClaim }}
- name: model
  mountPath: {{ .Values.modelStorage.mountPath }}
  readOnly: true
{{- with .Values.modelStorage.subPath }}
  subPath: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Environment of every orch container. */}}
{{- define "orch.env" -}}
- name: ORCH_TOPOLOGY
  value: /etc/orch/topology.yaml
- name: RAY_worker_niceness   # Ray workers (the serving ranks) at nice 0, not 15
  value: "0"
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* A gRPC health probe on the serve port, or a TCP check when the port speaks TLS. */}}
{{- define "orch.probe" -}}
{{- if .root.Values.tls.secretName -}}
tcpSocket:
  port: {{ .root.Values.service.grpcPort }}
{{- else -}}
grpc:
  port: {{ .root.Values.service.grpcPort }}
  service: {{ .root.Values.probes.grpcService | quote }}
{{- end }}
periodSeconds: {{ .probe.periodSeconds }}
failureThreshold: {{ .probe.failureThreshold }}
timeoutSeconds: {{ .probe.timeoutSeconds }}
{{- end -}}

{{/*
Pod template of a Ray pod. Arguments (a dict): root, component (head|worker|frontend),
group (worker group name), gpus, resources, nodeSelector, tolerations, labels, annotations.
*/}}
{{- define "orch.rayPodTemplate" -}}
{{- $root := .root -}}
{{- $resources := deepCopy (.resources | default dict) -}}
{{- $limits := get $resources "limits" | default dict -}}
{{- $requests := get $resources "requests" | default dict -}}
{{- $_ := unset $limits "nvidia.com/gpu" -}}
{{- $_ := unset $requests "nvidia.com/gpu" -}}
{{- if gt (int .gpus) 0 -}}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) -}}
{{- end -}}
{{- if $limits }}{{- $_ := set $resources "limits" $limits -}}{{- end -}}
{{- if $requests }}{{- $_ := set $resources "requests" $requests -}}{{- end -}}
metadata:
  labels:
    {{- include "orch.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
    {{- with .group }}
    orch/node-group: {{ . }}
    {{- end }}
    {{- with $root.Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
    {{- with .labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- /* No checksum of the topology here: a changed pod template may make KubeRay recreate pods, and
  `orch apply` updates a running deployment in place (the ConfigMap volume follows by itself). */}}
  {{- $annotations := merge (deepCopy (.annotations | default dict)) ($root.Values.podAnnotations | default dict) }}
  {{- with $annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $root.Values.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ if eq .component "head" }}ray-head{{ else }}ray-worker{{ end }}
      image: {{ include "orch.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        {{- include "orch.env" $root | nindent 8 }}
        {{- with .group }}
        - name: ORCH_NODE
          value: {{ . }}
        {{- end }}
        {{- if and (ne .component "head") $root.Values.tls.secretName }}
        - name: ORCH_TLS_CERT
          value: /var/run/orch/tls/tls.crt
        - name: ORCH_TLS_KEY
          value: /var/run/orch/tls/tls.key
        {{- end }}
      {{- if eq .component "head" }}
      ports:
        - {name: gcs, containerPort: 6379}
        - {name: dashboard, containerPort: 8265}
        - {name: client, containerPort: 10001}
      {{- else if eq .component "frontend" }}
      ports:
        - {name: grpc, containerPort: {{ $root.Values.service.grpcPort }}}
        - {name: metrics, containerPort: {{ $root.Values.service.metricsPort }}}
      startupProbe:
        {{- include "orch.probe" (dict "root" $root "probe" $root.Values.probes.startup) | nindent 8 }}
      readinessProbe:
        {{- include "orch.probe" (dict "root" $root "probe" $root.Values.probes.readiness) | nindent 8 }}
      {{- if $root.Values.probes.liveness.enabled }}
      livenessProbe:
        {{- include "orch.probe" (dict "root" $root "probe" $root.Values.probes.liveness) | nindent 8 }}
      {{- end }}
      {{- end }}
      {{- with $resources }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        {{- include "orch.volumeMounts" $root | nindent 8 }}
        - name: dshm
          mountPath: /dev/shm
        {{- if and (ne .component "head") $root.Values.tls.secretName }}
        - name: tls
          mountPath: /var/run/orch/tls
          readOnly: true
        {{- end }}
  volumes:
    {{- include "orch.volumes" $root | nindent 4 }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.shmSize }}
    {{- if and (ne .component "head") $root.Values.tls.secretName }}
    - name: tls
      secret:
        secretName: {{ $root.Values.tls.secretName }}
    {{- end }}
{{- end -}}

{{/* A rayStartParams map: KubeRay wants every value a string. */}}
{{- define "orch.rayStartParams" -}}
{{- $out := dict -}}
{{- range $k, $v := . }}{{ $_ := set $out $k (toString $v) }}{{ end -}}
{{- toYaml $out -}}
{{- end -}}

{{/*
rayStartParams `resources`: the JSON object in single quotes. KubeRay pastes the value into the shell
command `ray start --resources=...`, and both KubeRay (trimming the quotes) and Ray's autoscaler
(dropping the first and last character) read it back as JSON.
*/}}
{{- define "orch.rayResourcesParam" -}}
{{- printf "'%s'" (toJson .) -}}
{{- end -}}
