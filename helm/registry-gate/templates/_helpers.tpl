{{/*
Names and labels.
*/}}
{{- define "registry-gate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "registry-gate.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "registry-gate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "registry-gate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "registry-gate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "registry-gate.labels" -}}
helm.sh/chart: {{ include "registry-gate.chart" . }}
{{ include "registry-gate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "registry-gate.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "registry-gate.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "registry-gate.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
Where things live in the pod. /etc/registry-gate is one projected volume (gate.yaml,
policies/, secrets/, tls/), so nothing is mounted inside a read-only ConfigMap volume.
*/}}
{{- define "registry-gate.configDir" -}}/etc/registry-gate{{- end }}
{{- define "registry-gate.dataDir" -}}/var/lib/registry-gate{{- end }}
{{- define "registry-gate.signingKeyPath" -}}secrets/signing-key.pem{{- end }}
{{- define "registry-gate.htpasswdPath" -}}secrets/htpasswd{{- end }}

{{- define "registry-gate.scheme" -}}
{{- if .Values.tls.enabled }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/*
Policy file names, in precedence order: `policies`, then existingPolicies.files.
*/}}
{{- define "registry-gate.policyFileNames" -}}
{{- $names := list }}
{{- range $policy := .Values.policies }}
{{- $names = append $names $policy.name }}
{{- end }}
{{- range $name := .Values.existingPolicies.files }}
{{- $names = append $names $name }}
{{- end }}
{{- if ne (len $names) (len (uniq $names)) }}
{{- fail (printf "policy file names must be unique across policies and existingPolicies.files: %s" (join ", " $names)) }}
{{- end }}
{{- toJson $names }}
{{- end }}

{{/*
gate.yaml: .Values.config with the keys the chart owns filled in, checked for the
mistakes that would otherwise only show as a crash-looping pod.
*/}}
{{- define "registry-gate.gateYaml" -}}
{{- $root := . }}
{{- $configDir := include "registry-gate.configDir" . }}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- range $key := list "listen" "tls" }}
{{- if hasKey $cfg $key }}
{{- fail (printf "config.%s is set by the chart (containerPort, listenAddress, tls.*); remove it from config" $key) }}
{{- end }}
{{- end }}
{{- $_ := set $cfg "listen" (printf "%s:%d" (include "registry-gate.listenHost" .) (int .Values.containerPort)) }}
{{- $storage := deepCopy (get $cfg "storage" | default dict) }}
{{- if hasKey $storage "path" }}
{{- fail "config.storage.path is set by the chart (the cache volume); remove it from config" }}
{{- end }}
{{- $_ = set $storage "path" (printf "%s/cache" (include "registry-gate.dataDir" .)) }}
{{- $_ = set $cfg "storage" $storage }}
{{- $policy := deepCopy (get $cfg "policy" | default dict) }}
{{- if not (hasKey $policy "files") }}
{{- $files := list }}
{{- range $name := include "registry-gate.policyFileNames" . | fromJsonArray }}
{{- $files = append $files (printf "%s/policies/%s" $configDir $name) }}
{{- end }}
{{- $_ = set $policy "files" $files }}
{{- end }}
{{- $_ = set $cfg "policy" $policy }}
{{- $metrics := deepCopy (get $cfg "metrics" | default dict) }}
{{- if hasKey $metrics "listen" }}
{{- fail "config.metrics.listen is set by the chart (metrics.separatePort, metrics.port); remove it from config" }}
{{- end }}
{{- if .Values.metrics.separatePort }}
{{- $_ = set $metrics "listen" (printf "%s:%d" (include "registry-gate.listenHost" .) (int .Values.metrics.port)) }}
{{- end }}
{{- if $metrics }}
{{- $_ = set $cfg "metrics" $metrics }}
{{- end }}
{{- $auth := deepCopy (get $cfg "auth" | default dict) }}
{{- if .Values.auth.signingKey.existingSecret }}
{{- if hasKey $auth "signing_key" }}
{{- fail "config.auth.signing_key and auth.signingKey.existingSecret are both set; keep one" }}
{{- end }}
{{- $_ = set $auth "signing_key" (printf "%s/%s" $configDir (include "registry-gate.signingKeyPath" .)) }}
{{- end }}
{{- if .Values.auth.htpasswd.existingSecret }}
{{- if hasKey $auth "htpasswd" }}
{{- fail "config.auth.htpasswd and auth.htpasswd.existingSecret are both set; keep one" }}
{{- end }}
{{- $_ = set $auth "htpasswd" (printf "%s/%s" $configDir (include "registry-gate.htpasswdPath" .)) }}
{{- end }}
{{- if and (eq (toString (get $auth "mode")) "token") .Values.metrics.serviceMonitor.enabled (not .Values.metrics.separatePort) }}
{{- fail "config.auth.mode token answers /metrics on the main port only to operators: set metrics.separatePort: true for the ServiceMonitor" }}
{{- end }}
{{- if and (eq (toString (get $auth "mode")) "token") (not (get $auth "signing_key")) (not (get $auth "trusted_issuers")) }}
{{- fail "config.auth.mode token needs a signing key: set auth.signingKey.existingSecret (or config.auth.trusted_issuers)" }}
{{- end }}
{{- if $auth }}
{{- $_ = set $cfg "auth" $auth }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- if not .Values.tls.secretName }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- $_ = set $cfg "tls" (dict "cert_file" (printf "%s/tls/tls.crt" $configDir) "key_file" (printf "%s/tls/tls.key" $configDir)) }}
{{- end }}
{{- $provided := dict }}
{{- range .Values.upstreamCredentials }}
{{- $_ = set $provided .env true }}
{{- end }}
{{- range .Values.extraEnv }}
{{- $_ = set $provided .name true }}
{{- end }}
{{- include "registry-gate.scaleOutConfig" (dict "root" $root "cfg" $cfg "provided" $provided) }}
{{- range $upstream := get $cfg "upstreams" | default list }}
{{- if and $upstream.password_env (not (hasKey $provided $upstream.password_env)) }}
{{- fail (printf "config.upstreams (%s): password_env %s is not provided; add it to upstreamCredentials" $upstream.registry $upstream.password_env) }}
{{- end }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/*
Several replicas as one gate (README "Running several replicas"): the cache in an S3
bucket (config.storage.backend s3), shared state in Redis (config.redis). Mutates the
gate.yaml being built (`cfg`): the S3 keys and the Redis password come from environment
variables the pod sets from Secrets (`provided` gains their names). Refuses several
replicas on the filesystem backend: each would keep its own cache and short-name pins.
*/}}
{{- define "registry-gate.scaleOutConfig" -}}
{{- $root := .root }}
{{- $cfg := .cfg }}
{{- $provided := .provided }}
{{- $values := $root.Values }}
{{- $shared := include "registry-gate.sharedStorage" $root }}
{{- $storage := get $cfg "storage" }}
{{- $redis := deepCopy (get $cfg "redis" | default dict) }}
{{- if gt (int $values.replicaCount) 1 }}
{{- if not $shared }}
{{- fail (printf "replicaCount %d needs shared storage: set config.storage.backend: s3 (with config.storage.s3) and config.redis.url (README \"Running several replicas\"); on the filesystem backend every replica keeps its own cache and short-name pins" (int $values.replicaCount)) }}
{{- end }}
{{- if not (get $redis "url") }}
{{- fail (printf "replicaCount %d needs config.redis.url: the replicas share tags, pins, cache accounting and fills through Redis" (int $values.replicaCount)) }}
{{- end }}
{{- if not $values.uploadSecret.existingSecret }}
{{- fail (printf "replicaCount %d needs uploadSecret.existingSecret: a push's requests may reach any replica" (int $values.replicaCount)) }}
{{- end }}
{{- end }}
{{- if $shared }}
{{- $s3 := deepCopy (get $storage "s3" | default dict) }}
{{- if not (get $s3 "bucket") }}
{{- fail "config.storage.backend s3 needs config.storage.s3 (endpoint, bucket, region, ...)" }}
{{- end }}
{{- if $values.s3Credentials.existingSecret }}
{{- range $key := list "access_key_env" "secret_key_env" "access_key_file" "secret_key_file" }}
{{- if hasKey $s3 $key }}
{{- fail (printf "config.storage.s3.%s and s3Credentials.existingSecret are both set; keep one" $key) }}
{{- end }}
{{- end }}
{{- $_ := set $s3 "access_key_env" "S3_ACCESS_KEY" }}
{{- $_ = set $s3 "secret_key_env" "S3_SECRET_KEY" }}
{{- $_ = set $provided "S3_ACCESS_KEY" true }}
{{- $_ = set $provided "S3_SECRET_KEY" true }}
{{- end }}
{{- range $key := list "access_key_env" "secret_key_env" }}
{{- $name := get $s3 $key }}
{{- if and $name (not (hasKey $provided $name)) }}
{{- fail (printf "config.storage.s3.%s %s is not provided; set s3Credentials.existingSecret (or add it to extraEnv)" $key $name) }}
{{- end }}
{{- end }}
{{- $_ := set $storage "s3" $s3 }}
{{- if hasKey $cfg "replica" }}
{{- fail "config.replica is set by the chart: replica.id is the pod name, replica.peer_url the pod IP" }}
{{- end }}
{{- $audit := get $cfg "audit" | default dict }}
{{- $auditPath := toString (get $audit "path" | default "") }}
{{- if and $auditPath (not (contains "{replica}" $auditPath)) }}
{{- fail (printf "config.audit.path %s would be written by every replica: put {replica} in it (one hash chain per replica) or use config.audit.stdout" $auditPath) }}
{{- end }}
{{- else if eq (toString (get $storage "backend" | default "filesystem")) "filesystem" }}
{{- if $values.s3Credentials.existingSecret }}
{{- fail "s3Credentials.existingSecret is set but config.storage.backend is not s3" }}
{{- end }}
{{- end }}
{{- if $values.redisPassword.existingSecret }}
{{- if not (get $redis "url") }}
{{- fail "redisPassword.existingSecret is set but config.redis.url is not" }}
{{- end }}
{{- range $key := list "password_env" "password_file" }}
{{- if hasKey $redis $key }}
{{- fail (printf "config.redis.%s and redisPassword.existingSecret are both set; keep one" $key) }}
{{- end }}
{{- end }}
{{- $_ := set $redis "password_env" "REDIS_PASSWORD" }}
{{- $_ = set $provided "REDIS_PASSWORD" true }}
{{- end }}
{{- if and (get $redis "password_env") (not (hasKey $provided (get $redis "password_env"))) }}
{{- fail (printf "config.redis.password_env %s is not provided; set redisPassword.existingSecret (or add it to extraEnv)" (get $redis "password_env")) }}
{{- end }}
{{- if $redis }}
{{- $_ := set $cfg "redis" $redis }}
{{- end }}
{{- end }}

{{/*
"true" when the cache is shared by the replicas (config.storage.backend s3), else "".
*/}}
{{- define "registry-gate.sharedStorage" -}}
{{- $storage := (.Values.config | default dict).storage | default dict }}
{{- if eq (toString (get $storage "backend")) "s3" }}true{{ end }}
{{- end }}

{{/*
The workload kind: a Deployment when the cache is shared (nothing per pod to keep),
else workload.kind.
*/}}
{{- define "registry-gate.kind" -}}
{{- if include "registry-gate.sharedStorage" . }}Deployment{{ else }}{{ .Values.workload.kind }}{{ end }}
{{- end }}

{{- define "registry-gate.listenHost" -}}
{{- if contains ":" .Values.listenAddress }}
{{- printf "[%s]" .Values.listenAddress }}
{{- else }}
{{- .Values.listenAddress }}
{{- end }}
{{- end }}

{{/*
The ConfigMap's data: gate.yaml and one `policy.<file name>` key per policy file
(ConfigMap keys cannot hold the `policies/` folder; the volume's items put it back).
*/}}
{{- define "registry-gate.configData" -}}
{{- $data := dict "gate.yaml" (include "registry-gate.gateYaml" .) }}
{{- range $policy := .Values.policies }}
{{- $_ := set $data (printf "policy.%s" $policy.name) $policy.content }}
{{- end }}
{{- toYaml $data }}
{{- end }}

{{/*
The pod's grace period: the preStop sleep, then the gate's whole drain
(config.shutdown_timeout, the gate's default when unset), plus 5 s for the process
to exit. An explicit terminationGracePeriodSeconds must not be shorter.
*/}}
{{- define "registry-gate.terminationGracePeriod" -}}
{{- $drain := (.Values.config | default dict).shutdown_timeout | default 25 | float64 | ceil | int }}
{{- $needed := add (int .Values.preStopSleepSeconds) $drain 5 }}
{{- $set := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $set }}
{{- $needed }}
{{- else if lt (int $set) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds %d is shorter than preStopSleepSeconds + config.shutdown_timeout + 5 = %d" (int $set) (int $needed)) }}
{{- else }}
{{- int $set }}
{{- end }}
{{- end }}

{{/*
The pod template shared by the StatefulSet and the Deployment.
*/}}
{{- define "registry-gate.podTemplate" -}}
metadata:
  annotations:
    # gate.yaml is read once at start: a change rolls the pods. Policy files are hot
    # reloaded (the gate watches them), so they roll the pods only when asked to.
    checksum/config: {{ include "registry-gate.gateYaml" . | sha256sum }}
    {{- if .Values.rollOnPolicyChange }}
    checksum/policies: {{ toJson .Values.policies | sha256sum }}
    {{- end }}
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "registry-gate.selectorLabels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "registry-gate.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.automountServiceAccountToken }}
  # Kubernetes would inject <SERVICE>_PORT, <SERVICE>_SERVICE_HOST, ... for every
  # Service in the namespace; a Service named registry-gate yields REGISTRY_GATE_*
  # variables, which the gate reads as gate.yaml overrides and refuses.
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ include "registry-gate.terminationGracePeriod" . }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: registry-gate
      image: {{ include "registry-gate.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args:
        - serve
        - --config
        - {{ include "registry-gate.configDir" . }}/gate.yaml
      ports:
        - name: http
          containerPort: {{ .Values.containerPort }}
          protocol: TCP
        {{- if .Values.metrics.separatePort }}
        - name: metrics
          containerPort: {{ .Values.metrics.port }}
          protocol: TCP
        {{- end }}
      env:
        - name: TMPDIR
          value: /tmp
        {{- range .Values.upstreamCredentials }}
        - name: {{ .env }}
          valueFrom:
            secretKeyRef:
              name: {{ .secretName }}
              key: {{ .secretKey }}
        {{- end }}
        {{- if .Values.uploadSecret.existingSecret }}
        - name: REGISTRY_GATE_UPLOAD_SECRET
          valueFrom:
            secretKeyRef:
              name: {{ .Values.uploadSecret.existingSecret }}
              key: {{ .Values.uploadSecret.key }}
        {{- end }}
        {{- if include "registry-gate.sharedStorage" . }}
        # This pod as one replica: its audit chain and fill leases are named after the
        # pod, and the other replicas reach it at its pod IP.
        - name: REGISTRY_GATE_REPLICA__ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_IP
          valueFrom:
            fieldRef:
              fieldPath: status.podIP
        - name: REGISTRY_GATE_REPLICA__PEER_URL
          value: {{ printf "%s://%s:%d" (include "registry-gate.scheme" . | lower) (ternary "[$(POD_IP)]" "$(POD_IP)" (contains ":" .Values.listenAddress)) (int .Values.containerPort) | quote }}
        {{- with .Values.s3Credentials.existingSecret }}
        - name: S3_ACCESS_KEY
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $.Values.s3Credentials.accessKeyKey }}
        - name: S3_SECRET_KEY
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $.Values.s3Credentials.secretKeyKey }}
        {{- end }}
        {{- end }}
        {{- with .Values.redisPassword.existingSecret }}
        - name: REDIS_PASSWORD
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $.Values.redisPassword.key }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      startupProbe:
        httpGet:
          path: /healthz
          port: http
          scheme: {{ include "registry-gate.scheme" . }}
        {{- toYaml .Values.startupProbe | nindent 8 }}
      livenessProbe:
        httpGet:
          path: /healthz
          port: http
          scheme: {{ include "registry-gate.scheme" . }}
        {{- toYaml .Values.livenessProbe | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /readyz
          port: http
          scheme: {{ include "registry-gate.scheme" . }}
        {{- toYaml .Values.readinessProbe | nindent 8 }}
      {{- if gt (int .Values.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", {{ .Values.preStopSleepSeconds | int | toString | quote }}]
      {{- end }}
      resources:
        {{- toYaml .Values.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: {{ include "registry-gate.configDir" . }}
          readOnly: true
        - name: cache
          mountPath: {{ include "registry-gate.dataDir" . }}
        - name: tmp
          mountPath: /tmp
  volumes:
    # gate.yaml, policies and secrets in one projected volume. No subPath: a subPath
    # mount never sees ConfigMap updates, which policy hot reload relies on.
    - name: config
      projected:
        defaultMode: 0440
        sources:
          - configMap:
              name: {{ include "registry-gate.fullname" . }}
              items:
                - key: gate.yaml
                  path: gate.yaml
                {{- range $policy := .Values.policies }}
                - key: policy.{{ $policy.name }}
                  path: policies/{{ $policy.name }}
                {{- end }}
          {{- if .Values.existingPolicies.configMap }}
          - configMap:
              name: {{ .Values.existingPolicies.configMap }}
              items:
                {{- range .Values.existingPolicies.files }}
                - key: {{ . }}
                  path: policies/{{ . }}
                {{- end }}
          {{- end }}
          {{- if .Values.auth.signingKey.existingSecret }}
          - secret:
              name: {{ .Values.auth.signingKey.existingSecret }}
              items:
                - key: {{ .Values.auth.signingKey.key }}
                  path: {{ include "registry-gate.signingKeyPath" . }}
          {{- end }}
          {{- if .Values.auth.htpasswd.existingSecret }}
          - secret:
              name: {{ .Values.auth.htpasswd.existingSecret }}
              items:
                - key: {{ .Values.auth.htpasswd.key }}
                  path: {{ include "registry-gate.htpasswdPath" . }}
          {{- end }}
          {{- if .Values.tls.enabled }}
          - secret:
              name: {{ .Values.tls.secretName }}
              items:
                - key: tls.crt
                  path: tls/tls.crt
                - key: tls.key
                  path: tls/tls.key
          {{- end }}
    - name: tmp
      emptyDir:
        {{- with .Values.tmp.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- if eq (include "registry-gate.cacheVolumeSource" .) "pvc" }}
    - name: cache
      persistentVolumeClaim:
        claimName: {{ default (printf "%s-cache" (include "registry-gate.fullname" .)) .Values.persistence.existingClaim }}
    {{- else if eq (include "registry-gate.cacheVolumeSource" .) "emptyDir" }}
    - name: cache
      emptyDir:
        {{- with .Values.emptyDir.sizeLimit }}
        sizeLimit: {{ . }}
        {{- end }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml .Values.topologySpreadConstraints | nindent 4 }}
  {{- else if and (include "registry-gate.sharedStorage" .) (gt (int .Values.replicaCount) 1) }}
  # Replicas of one gate: spread over nodes and zones, so a node drain or a zone outage
  # leaves some serving (ScheduleAnyway: a small cluster still schedules them all).
  topologySpreadConstraints:
    {{- range $key := list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
    - maxSkew: 1
      topologyKey: {{ $key }}
      whenUnsatisfiable: ScheduleAnyway
      labelSelector:
        matchLabels:
          {{- include "registry-gate.selectorLabels" $ | nindent 10 }}
    {{- end }}
  {{- end }}
{{- end }}

{{/*
Where the cache volume comes from: "claimTemplate" (StatefulSet with persistence),
"pvc" (Deployment with persistence: existingClaim or the chart's PVC) or "emptyDir".
*/}}
{{- define "registry-gate.cacheVolumeSource" -}}
{{- if or (not .Values.persistence.enabled) (include "registry-gate.sharedStorage" .) }}emptyDir
{{- else if eq .Values.workload.kind "StatefulSet" }}
{{- if .Values.persistence.existingClaim }}
{{- fail "persistence.existingClaim is for workload.kind Deployment; a StatefulSet gets a PVC per replica" }}
{{- end }}claimTemplate
{{- else }}pvc
{{- end }}
{{- end }}
