{{/*
Chart name, shortened to the 63 characters a DNS label allows.
*/}}
{{- define "tokenfleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources: <release>-<chart>, or the release name alone when it
already contains the chart name.
*/}}
{{- define "tokenfleet.fullname" -}}
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

{{/*
Name of the broker's resources.
*/}}
{{- define "tokenfleet.broker.fullname" -}}
{{- printf "%s-broker" (include "tokenfleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokenfleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every resource of the broker.
*/}}
{{- define "tokenfleet.broker.labels" -}}
helm.sh/chart: {{ include "tokenfleet.chart" . }}
{{ include "tokenfleet.broker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tokenfleet
{{- end }}

{{/*
Labels that select the broker pods (never change them: Deployment selectors are immutable).
*/}}
{{- define "tokenfleet.broker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: broker
{{- end }}

{{- define "tokenfleet.broker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tokenfleet.broker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tokenfleet.broker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The Secret holding the sealing keys.
*/}}
{{- define "tokenfleet.seal.secretName" -}}
{{- default (printf "%s-seal" (include "tokenfleet.fullname" .)) .Values.seal.existingSecret }}
{{- end }}

{{/*
The PersistentVolumeClaim of the embedded store.
*/}}
{{- define "tokenfleet.broker.claimName" -}}
{{- default (printf "%s-data" (include "tokenfleet.broker.fullname" .)) .Values.store.embedded.persistence.existingClaim }}
{{- end }}

{{/*
Paths inside the broker container.
*/}}
{{- define "tokenfleet.paths.config" -}}/etc/tokenfleet/broker.toml{{- end }}
{{- define "tokenfleet.paths.state" -}}/var/lib/tokenfleet{{- end }}
{{- define "tokenfleet.paths.seal" -}}/etc/tokenfleet/seal{{- end }}
{{- define "tokenfleet.paths.redisPassword" -}}/etc/tokenfleet/redis/password{{- end }}
{{- define "tokenfleet.paths.redisCa" -}}/etc/tokenfleet/redis-ca/ca.pem{{- end }}
{{- define "tokenfleet.paths.tls" -}}/etc/tokenfleet/tls{{- end }}
{{- define "tokenfleet.paths.agentCa" -}}/etc/tokenfleet/agent-ca{{- end }}

{{/*
`[tokens]` keys of the broker configuration by their camelCase names in values.yaml.
*/}}
{{- define "tokenfleet.tokenKeys" -}}
refreshMarginSeconds: refresh_margin_seconds
maxRefreshIntervalSeconds: max_refresh_interval_seconds
providerTimeoutSeconds: provider_timeout_seconds
leaseTtlSeconds: lease_ttl_seconds
backoffMinSeconds: backoff_min_seconds
backoffMaxSeconds: backoff_max_seconds
schedulerIntervalMs: scheduler_interval_ms
schedulerBatch: scheduler_batch
schedulerConcurrency: scheduler_concurrency
{{- end }}

{{/*
Combinations the schema cannot express; `helm template` and `helm install` stop with the message.
*/}}
{{- define "tokenfleet.validate" -}}
{{- $v := .Values }}
{{- if and (eq $v.store.backend "embedded") (gt (int $v.replicaCount) 1) }}
{{- fail (printf "replicaCount is %d but store.backend=embedded allows exactly one replica (one database file on one volume); set replicaCount: 1, or store.backend: redis for more" (int $v.replicaCount)) }}
{{- end }}
{{- if not (has $v.seal.currentKeyId $v.seal.keyIds) }}
{{- fail (printf "seal.currentKeyId %q is not one of seal.keyIds %v" $v.seal.currentKeyId $v.seal.keyIds) }}
{{- end }}
{{- if and (eq $v.store.backend "redis") (eq $v.store.redis.mode "sentinel") (not $v.store.redis.sentinelMaster) }}
{{- fail "store.redis.sentinelMaster is required with store.redis.mode=sentinel" }}
{{- end }}
{{- if eq $v.store.backend "redis" }}
{{- range $v.store.redis.urls }}
{{- if and (ne $v.store.redis.mode "sentinel") (ne $v.store.redis.tls (hasPrefix "rediss://" .)) }}
{{- fail (printf "store.redis.urls: %q must start with %s because store.redis.tls is %v" . (ternary "rediss://" "redis://" $v.store.redis.tls) $v.store.redis.tls) }}
{{- end }}
{{- if regexMatch "^rediss?://[^/@]*:[^/@]*@" . }}
{{- fail "store.redis.urls: put no password in a URL (it would land in a ConfigMap); use store.redis.existingSecret" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
