{{/*
Names that other objects refer to. Objects have fixed names (meshid-ca,
meshid-agent, ...), not names derived from the release: meshid is installed
once per cluster (its ClusterRoles, its admission policy and the trust-bundle
ConfigMap in every namespace are cluster-wide).
*/}}

{{/* The image of a component: .image is {repository, tag, pullPolicy}. */}}
{{- define "meshid.image" -}}
{{ .image.repository }}:{{ .image.tag | default .appVersion }}
{{- end }}

{{/* The user name meshid-ca's requests carry. */}}
{{- define "meshid.caUser" -}}
system:serviceaccount:{{ .Values.namespaces.ca }}:meshid-ca
{{- end }}

{{/* meshid-ca's --admin-service-accounts, comma-separated; empty for none. */}}
{{- define "meshid.adminServiceAccounts" -}}
{{- $accounts := list -}}
{{- with .Values.admin.serviceAccount.name -}}
{{- $accounts = append $accounts (printf "%s/%s" $.Values.namespaces.ca .) -}}
{{- end -}}
{{- join "," (concat $accounts .Values.admin.extraServiceAccounts) -}}
{{- end }}

{{/*
Checks across values that values.schema.json cannot express; rendered by
ca.yaml, so every render runs them.
*/}}
{{- define "meshid.validate" -}}
{{- if and (eq .Values.ledger.type "sqlite") (gt (int .Values.ca.replicas) 1) -}}
{{- fail (printf "ledger.type sqlite needs ca.replicas 1, not %d: a SQLite ledger is a file in one pod; use ledger.type postgres for several replicas" (int .Values.ca.replicas)) -}}
{{- end -}}
{{- if eq .Values.namespaces.ca .Values.namespaces.agent -}}
{{- fail (printf "namespaces.ca and namespaces.agent are both %s: meshid-agent needs Pod Security's privileged level for its hostPath, which meshid-ca's namespace must not have" .Values.namespaces.ca) -}}
{{- end -}}
{{- if and .Values.admin.serviceAccount.create (not .Values.admin.serviceAccount.name) -}}
{{- fail "admin.serviceAccount.create is true but admin.serviceAccount.name is empty" -}}
{{- end -}}
{{- if and (eq .Values.ca.caSource "step") (not .Values.ca.step.url) -}}
{{- fail "ca.caSource step needs ca.step.url, step-ca's https://host:port (deploy/step-ca.md)" -}}
{{- end -}}
{{- if and .Values.multicluster.remoteBundleConfigMaps (not .Values.multicluster.remoteSecretSelector) -}}
{{- fail "multicluster.remoteBundleConfigMaps needs multicluster.remoteSecretSelector: the remote clusters come from those Secrets" -}}
{{- end -}}
{{- end }}
