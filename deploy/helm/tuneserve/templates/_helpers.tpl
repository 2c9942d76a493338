{{/* _helpers.tpl: names, labels, the checks on value combinations and the computed pod fields
(resources with the GPU limit, tolerations, update strategy, data claim) shared by the templates. */}}

{{- define "tuneserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: <release>-<chart> unless the release name already contains the chart name. */}}
{{- define "tuneserve.fullname" -}}
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

{{- define "tuneserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tuneserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tuneserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tuneserve.labels" -}}
helm.sh/chart: {{ include "tuneserve.chart" . }}
{{ include "tuneserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: server
{{- end }}

{{- define "tuneserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tuneserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tuneserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The claim that holds the data root. */}}
{{- define "tuneserve.dataClaimName" -}}
{{- if .Values.dataRoot.persistence.create }}
{{- printf "%s-data" (include "tuneserve.fullname" .) }}
{{- else }}
{{- .Values.dataRoot.persistence.existingClaim }}
{{- end }}
{{- end }}

{{/* Value combinations the schema cannot express; each fails the render with the fix in the message. */}}
{{- define "tuneserve.validate" -}}
{{- $persistence := .Values.dataRoot.persistence }}
{{- if and (not $persistence.create) (not $persistence.existingClaim) }}
{{- fail "dataRoot.persistence: set create=true or name an existingClaim (the data root must be a PersistentVolume)" }}
{{- end }}
{{- if and (gt (int .Values.replicas) 1) (ne $persistence.accessMode "ReadWriteMany") }}
{{- fail (printf "replicas=%d needs dataRoot.persistence.accessMode=ReadWriteMany (every replica serves every adapter from the shared data root); got %s" (int .Values.replicas) $persistence.accessMode) }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.source=pvc needs model.pvc.claimName" }}
{{- end }}
{{- if and (eq .Values.model.source "hostPath") (not (hasPrefix "/" .Values.model.hostPath.path)) }}
{{- fail "model.source=hostPath needs an absolute model.hostPath.path" }}
{{- end }}
{{- if and (eq .Values.device "cuda") (not .Values.gpu.enabled) }}
{{- fail "device=cuda needs gpu.enabled=true (or use device=auto or cpu)" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.server.port)) }}
{{- fail "metrics.port must differ from server.port" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.enabled=true" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecret) (or (not .Values.tls.cert) (not .Values.tls.key)) }}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret) or tls.cert and tls.key (PEM)" }}
{{- end }}
{{- if and .Values.tls.clientAuth (not .Values.tls.enabled) }}
{{- fail "tls.clientAuth needs tls.enabled=true (mutual TLS is TLS)" }}
{{- end }}
{{- if and .Values.tls.clientAuth (not .Values.tls.existingSecret) (not .Values.tls.clientCa) }}
{{- fail "tls.clientAuth needs tls.clientCa (PEM), or ca.crt in tls.existingSecret" }}
{{- end }}
{{- if and .Values.tls.enabled (eq (int .Values.server.healthPort) (int .Values.server.port)) }}
{{- fail "server.healthPort must differ from server.port" }}
{{- end }}
{{- if and .Values.auth.keys .Values.auth.existingKeysSecret }}
{{- fail "auth: give auth.keys or auth.existingKeysSecret, not both" }}
{{- end }}
{{- if and .Values.auth.existingSecret (or .Values.auth.keys .Values.auth.existingKeysSecret) }}
{{- fail "auth.existingSecret (deprecated tokens) cannot be combined with API keys; move the tokens to keys" }}
{{- end }}
{{- $budget := add .Values.shutdown.preStopSleepSeconds 10 }}
{{- if lt (int .Values.shutdown.terminationGracePeriodSeconds) (int $budget) }}
{{- fail (printf "shutdown.terminationGracePeriodSeconds must be at least preStopSleepSeconds + 10 (the server's drain); got %d" (int .Values.shutdown.terminationGracePeriodSeconds)) }}
{{- end }}
{{- end }}

{{/* resources with the GPU added to limits when gpu.enabled. */}}
{{- define "tuneserve.resources" -}}
{{- $resources := deepCopy (.Values.resources | default dict) }}
{{- if .Values.gpu.enabled }}
{{- $limits := deepCopy (get $resources "limits" | default dict) }}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* tolerations as given, plus gpu.toleration when gpu.enabled and none of them has its key. */}}
{{- define "tuneserve.tolerations" -}}
{{- $tolerations := list }}
{{- $hasGpuKey := false }}
{{- range .Values.tolerations }}
{{- $tolerations = append $tolerations . }}
{{- if eq (toString (get . "key")) (toString (get $.Values.gpu.toleration "key")) }}
{{- $hasGpuKey = true }}
{{- end }}
{{- end }}
{{- if and .Values.gpu.enabled (not $hasGpuKey) }}
{{- $tolerations = append $tolerations .Values.gpu.toleration }}
{{- end }}
{{- if $tolerations }}
{{- toYaml $tolerations }}
{{- end }}
{{- end }}

{{/* The Deployment strategy: as given, else Recreate for a single-attach volume, else a rolling update
that never needs a spare GPU. */}}
{{- define "tuneserve.strategy" -}}
{{- if .Values.updateStrategy }}
{{- toYaml .Values.updateStrategy }}
{{- else if ne .Values.dataRoot.persistence.accessMode "ReadWriteMany" }}
type: Recreate
{{- else }}
type: RollingUpdate
rollingUpdate:
  maxSurge: 0
  maxUnavailable: 1
{{- end }}
{{- end }}

{{/* The keys Secret's name, or "" without API keys. */}}
{{- define "tuneserve.keysSecretName" -}}
{{- if .Values.auth.existingKeysSecret }}
{{- .Values.auth.existingKeysSecret }}
{{- else if .Values.auth.keys }}
{{- printf "%s-keys" (include "tuneserve.fullname" .) }}
{{- end }}
{{- end }}

{{/* The TLS Secret's name (tls.enabled only). */}}
{{- define "tuneserve.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "tuneserve.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* The port the probes use: the gRPC port, or the plaintext health port when it has TLS. */}}
{{- define "tuneserve.probePort" -}}
{{- if .Values.tls.enabled }}{{ int .Values.server.healthPort }}{{ else }}{{ int .Values.server.port }}{{ end }}
{{- end }}

{{/* The server's drain budget, ms: what terminationGracePeriodSeconds leaves after the preStop sleep, less 5 s. */}}
{{- define "tuneserve.graceMs" -}}
{{- mul (sub (sub (int .Values.shutdown.terminationGracePeriodSeconds) (int .Values.shutdown.preStopSleepSeconds)) 5) 1000 }}
{{- end }}

{{/* The startup probe's failureThreshold: enough periods to cover modelLoadSeconds. */}}
{{- define "tuneserve.startupFailureThreshold" -}}
{{- $period := int .Values.probes.startup.periodSeconds }}
{{- div (add (int .Values.probes.startup.modelLoadSeconds) (sub $period 1)) $period }}
{{- end }}

{{/* affinity: as given; with gpu.enabled and no nodeAffinity given, a required GPU-node affinity added. */}}
{{- define "tuneserve.affinity" -}}
{{- $affinity := deepCopy (.Values.affinity | default dict) }}
{{- if and .Values.gpu.enabled .Values.gpu.nodeAffinity.enabled (not (hasKey $affinity "nodeAffinity")) }}
{{- $expression := dict "key" .Values.gpu.nodeAffinity.key "operator" "In" "values" .Values.gpu.nodeAffinity.values }}
{{- $term := dict "matchExpressions" (list $expression) }}
{{- $_ := set $affinity "nodeAffinity" (dict "requiredDuringSchedulingIgnoredDuringExecution" (dict "nodeSelectorTerms" (list $term))) }}
{{- end }}
{{- if $affinity }}
{{- toYaml $affinity }}
{{- end }}
{{- end }}
