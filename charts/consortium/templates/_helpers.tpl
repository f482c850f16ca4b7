{{- define "consortium.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "consortium.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: consortium
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "consortium.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "consortium.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "consortium.operatorServiceAccount" -}}
{{ include "consortium.fullname" . }}-operator
{{- end -}}

{{- define "consortium.agentServiceAccount" -}}
{{ include "consortium.fullname" . }}-agent
{{- end -}}

{{- define "consortium.apiServiceAccount" -}}
{{ include "consortium.fullname" . }}-api
{{- end -}}

{{/* Where the OpenAI-compatible endpoint makes its sessions. */}}
{{- define "consortium.apiNamespace" -}}
{{ .Values.api.namespace | default .Release.Namespace }}
{{- end -}}

{{- define "consortium.pruneServiceAccount" -}}
{{ include "consortium.fullname" . }}-prune
{{- end -}}

{{/* Where the prune CronJob deletes ended sessions. */}}
{{- define "consortium.pruneNamespace" -}}
{{ .Values.prune.namespace | default (include "consortium.apiNamespace" .) }}
{{- end -}}

{{/* The model files, for the agents (stages) and the operator (layer count, tokenizer, sha256): one
volume definition for both, mounted read-only at /models. */}}
{{- define "consortium.modelsMount" -}}
{{- if ne .Values.models.type "none" -}}
- name: models
  mountPath: /models
  readOnly: true
{{- end }}
{{- end -}}

{{- define "consortium.modelsVolume" -}}
{{- if eq .Values.models.type "hostPath" -}}
- name: models
  hostPath:
    path: {{ .Values.models.hostPath }}
    type: DirectoryOrCreate
{{- else if eq .Values.models.type "pvc" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ required "models.existingClaim is required when models.type is pvc" .Values.models.existingClaim }}
    readOnly: true
{{- else if ne .Values.models.type "none" }}
{{- fail "models.type must be hostPath, pvc or none" }}
{{- end }}
{{- end -}}

{{/* "true" when the operator issues the certificates (tls.issuer operator, TLS on), else empty. */}}
{{- define "consortium.operatorIssues" -}}
{{- if not (has .Values.tls.issuer (list "admin" "operator")) -}}
{{- fail "tls.issuer must be admin or operator" }}
{{- end -}}
{{- if and (not .Values.devPlaintext) (eq .Values.tls.issuer "operator") -}}true{{- end -}}
{{- end -}}
