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
{{- define "tokenfleet.paths.alertsWebhook" -}}/etc/tokenfleet/alerts-webhook/secret{{- end }}
{{- define "tokenfleet.paths.bootstrapKey" -}}/etc/tokenfleet/bootstrap/key{{- end }}

{{/*
The broker's public HTTP base URL: http.publicUrl, else the Ingress host, else empty (the
broker's default).
*/}}
{{- define "tokenfleet.publicUrl" -}}
{{- if .Values.http.publicUrl }}
{{- .Values.http.publicUrl }}
{{- else if .Values.ingress.enabled }}
{{- printf "%s://%s" (ternary "https" "http" (ne .Values.ingress.tlsSecret "")) .Values.ingress.host }}
{{- end }}
{{- end }}

{{/*
The bootstrap admin key's Secret: bootstrapAdminKey.existingSecret, else the one the chart makes.
*/}}
{{- define "tokenfleet.bootstrapKey.secretName" -}}
{{- default (printf "%s-admin-key" (include "tokenfleet.broker.fullname" .)) .Values.bootstrapAdminKey.existingSecret }}
{{- end }}

{{/*
The relay agent: names, labels, image, the broker URL it enrolls with and the CA it trusts.
*/}}
{{- define "tokenfleet.relay.fullname" -}}
{{- printf "%s-relay" (include "tokenfleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tokenfleet.relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tokenfleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: relay-agent
{{- end }}

{{- define "tokenfleet.relay.labels" -}}
helm.sh/chart: {{ include "tokenfleet.chart" . }}
{{ include "tokenfleet.relay.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tokenfleet
{{- end }}

{{- define "tokenfleet.relay.image" -}}
{{- printf "%s:%s" .Values.relayAgent.image.repository (default .Chart.AppVersion .Values.relayAgent.image.tag) }}
{{- end }}

{{- define "tokenfleet.relay.brokerUrl" -}}
{{- default (printf "https://%s.%s.svc:%d" (include "tokenfleet.broker.fullname" .) .Release.Namespace (int .Values.grpc.port)) .Values.relayAgent.brokerUrl }}
{{- end }}

{{- define "tokenfleet.relay.caSecret" -}}
{{- default .Values.tls.existingSecret .Values.relayAgent.brokerCa.existingSecret }}
{{- end }}

{{/*
Paths inside the relay agent container.
*/}}
{{- define "tokenfleet.relay.paths.config" -}}/etc/tokenfleet-agent/agent.toml{{- end }}
{{- define "tokenfleet.relay.paths.state" -}}/var/lib/tokenfleet-agent{{- end }}
{{- define "tokenfleet.relay.paths.code" -}}/run/tokenfleet-agent/enrollment/code{{- end }}
{{- define "tokenfleet.relay.paths.brokerCa" -}}/run/tokenfleet-agent/broker-ca/ca.crt{{- end }}

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
{{- if and $v.autoscaling.enabled (eq $v.store.backend "embedded") }}
{{- fail "autoscaling.enabled needs store.backend=redis: the embedded store allows exactly one replica" }}
{{- end }}
{{- if and $v.autoscaling.enabled (gt (int $v.autoscaling.minReplicas) (int $v.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.maxReplicas (%d) must be at least autoscaling.minReplicas (%d)" (int $v.autoscaling.maxReplicas) (int $v.autoscaling.minReplicas)) }}
{{- end }}
{{- if $v.relayAgent.enabled }}
{{- if not $v.relayAgent.enrollment.existingSecret }}
{{- fail "relayAgent.enrollment.existingSecret is required with relayAgent.enabled: a Secret holding the one-time code from `tokenfleetctl agent enroll-code <agent>`" }}
{{- end }}
{{- if not $v.tls.existingSecret }}
{{- fail "relayAgent.enabled needs tls.existingSecret: agents authenticate to the broker with client certificates over TLS" }}
{{- end }}
{{- if eq (int $v.relayAgent.smtpPort) (int $v.relayAgent.pop3Port) }}
{{- fail "relayAgent.smtpPort and relayAgent.pop3Port must differ" }}
{{- end }}
{{- range $key, $_ := $v.relayAgent.settings }}
{{- if has $key (list "state_dir" "smtp_listen" "pop3_listen" "broker_url" "metrics") }}
{{- fail (printf "relayAgent.settings.%s is set by the chart; use relayAgent.smtpPort, relayAgent.pop3Port, relayAgent.metrics or relayAgent.brokerUrl" $key) }}
{{- end }}
{{- end }}
{{- if and $v.relayAgent.metrics.enabled (has (int $v.relayAgent.metrics.port) (list (int $v.relayAgent.smtpPort) (int $v.relayAgent.pop3Port))) }}
{{- fail (printf "relayAgent.metrics.port %d is already relayAgent.smtpPort or relayAgent.pop3Port" (int $v.relayAgent.metrics.port)) }}
{{- end }}
{{- end }}
{{- if and $v.ingress.enabled (not $v.ingress.host) }}
{{- fail "ingress.host is required with ingress.enabled=true" }}
{{- end }}
{{- if and $v.ingress.enabled $v.ingress.console (not $v.http.trustedProxies) }}
{{- fail "ingress.console=true needs http.trustedProxies (the ingress controller's pod range): without it every console sign-in comes from the controller's address, so failed sign-ins from anyone would lock every operator out" }}
{{- end }}
{{- $hook := $v.alerts.webhook }}
{{- if and $hook.url (not $hook.secretName) }}
{{- fail "alerts.webhook.secretName is required with alerts.webhook.url: the broker signs every alert request with the HMAC key from that Secret" }}
{{- end }}
{{- if and $hook.secretName (not $hook.url) }}
{{- fail "alerts.webhook.url is required with alerts.webhook.secretName: there is no URL to send alerts to" }}
{{- end }}
{{- $mail := $v.alerts.email }}
{{- if and $mail.to (not $mail.fromMailbox) }}
{{- fail "alerts.email.fromMailbox (<tenant>/<mailbox>) is required with alerts.email.to" }}
{{- end }}
{{- if and $mail.to (not $mail.smtpHost) }}
{{- fail "alerts.email.smtpHost is required with alerts.email.to" }}
{{- end }}
{{- if gt (int64 $v.alerts.retryMinMs) (int64 $v.alerts.retryMaxMs) }}
{{- fail (printf "alerts.retryMaxMs (%d) must be at least alerts.retryMinMs (%d)" (int64 $v.alerts.retryMaxMs) (int64 $v.alerts.retryMinMs)) }}
{{- end }}
{{- $a := $v.alerts }}
{{- $roundMs := mul 2 (add (mul (int64 $a.timeoutSeconds) 1000 (int64 $a.retryAttempts)) (mul (int64 $a.retryMaxMs) (sub (int64 $a.retryAttempts) 1))) }}
{{- if lt (mul (int64 $a.redeliverAfterSeconds) 1000) $roundMs }}
{{- fail (printf "alerts.redeliverAfterSeconds must be at least %d: a delivery round (retryAttempts × timeoutSeconds plus the pauses up to retryMaxMs, for webhook and e-mail) must end before another replica takes the alert over" (div (add $roundMs 999) 1000)) }}
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
