{{/*
Chart name, truncated to the 63 characters Kubernetes names allow.
*/}}
{{- define "llm-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: release-chart, or the release name alone when it already contains the chart name.
*/}}
{{- define "llm-gateway.fullname" -}}
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

{{- define "llm-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llm-gateway.labels" -}}
helm.sh/chart: {{ include "llm-gateway.chart" . }}
{{ include "llm-gateway.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llm-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret the gateway's environment comes from.
*/}}
{{- define "llm-gateway.secretName" -}}
{{- default (include "llm-gateway.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{/*
The port the gateway listens on (config.server.port, default 8080).
*/}}
{{- define "llm-gateway.port" -}}
{{- $server := .Values.config.server | default (dict) }}
{{- $server.port | default 8080 | int }}
{{- end }}

{{/*
"true" when the gateway will have a Redis: config.redis.url is set, and if it is ${REDIS_URL...},
the Secret provides REDIS_URL (or an existing Secret is used, which may).
*/}}
{{- define "llm-gateway.hasRedis" -}}
{{- $redis := .Values.config.redis | default (dict) }}
{{- $url := $redis.url | default "" | toString }}
{{- if and $url (or (not (contains "${REDIS_URL" $url)) .Values.secret.existingSecret .Values.secret.env.REDIS_URL) }}true{{ end }}
{{- end }}
