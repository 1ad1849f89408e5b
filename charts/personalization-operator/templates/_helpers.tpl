{{/* Chart name, overridable. */}}
{{- define "pjo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name for every object this chart creates. */}}
{{- define "pjo.fullname" -}}
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

{{- define "pjo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select the operator pod; never change them on upgrade. */}}
{{- define "pjo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pjo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pjo.labels" -}}
helm.sh/chart: {{ include "pjo.chart" . }}
{{ include "pjo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: personalization-job
{{- end }}

{{- define "pjo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pjo.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pjo.operatorImage" -}}
{{- printf "%s:%s" .Values.image.operator.repository (default .Chart.AppVersion .Values.image.operator.tag) }}
{{- end }}

{{- define "pjo.trainerImage" -}}
{{- printf "%s:%s" .Values.image.trainer.repository (default .Chart.AppVersion .Values.image.trainer.tag) }}
{{- end }}

{{/* spec.image prefixes the operator accepts: the values' list, by default the trainer
repository (any tag or digest of it); "*" alone: any image (the operator's empty list). */}}
{{- define "pjo.allowedImagePrefixes" -}}
{{- $prefixes := .Values.admission.allowedImagePrefixes | default (list .Values.image.trainer.repository) -}}
{{- if has "*" $prefixes -}}{{- else -}}{{ join "," $prefixes }}{{- end -}}
{{- end }}
