{{/* Names and labels, as `helm create` makes them. */}}
{{- define "pgproxy.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "pgproxy.fullname" -}}
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

{{- define "pgproxy.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "pgproxy.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "pgproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ include "pgproxy.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "pgproxy.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "pgproxy.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "pgproxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Paths inside the pod. The tests map these same roots onto a directory to run pgproxy
with the rendered configuration, so change them together with tests/unit/test_helm_chart.py. */}}
{{- define "pgproxy.configDir" -}}/etc/pgproxy{{- end }}
{{- define "pgproxy.secretsDir" -}}/run/pgproxy/secrets{{- end }}
{{- define "pgproxy.secretSourceDir" -}}/run/pgproxy/secret-source{{- end }}
{{- define "pgproxy.tlsDir" -}}/run/pgproxy/tls{{- end }}
{{- define "pgproxy.dataDir" -}}/var/lib/pgproxy{{- end }}

{{/* Every secret the chart can mount: its values field, its key in the Secret (also the file
name), the pgproxy.toml option that names the file, and the table that must exist for it. */}}
{{- define "pgproxy.secretTable" -}}
backendPassword: {key: backend-password, option: backend.password_file}
adminToken: {key: admin-token, option: http.admin_token_file}
identitySigningKey: {key: identity-signing-key, option: identity.signing_key_file}
roleSecrets: {key: role-secrets.toml, option: backend.role_secrets_file}
jwtSharedSecret: {key: jwt-shared-secret, option: auth.jwt.shared_secret_file, needs: auth.jwt}
introspectionClientSecret: {key: introspection-client-secret, option: auth.jwt.introspection_client_secret_file, needs: auth.jwt}
ldapBindPassword: {key: ldap-bind-password, option: auth.ldap.bind_password_file, needs: auth.ldap}
serviceAccounts: {key: service-accounts.toml, option: auth.service_accounts.file}
auditSigningKey: {key: audit-signing-key.pem, option: audit.signing_key_file}
controlPassword: {key: control-password, option: control.password_file, needs: control}
controlPeerSecret: {key: control-peer-secret, option: control.peer_secret_file, needs: control}
{{- end }}

{{/* The secrets that are set, as a YAML list of {field, key, option, needs}: the values that are
not empty, or with secrets.existingSecret the keys listed in secrets.existingSecretKeys. */}}
{{- define "pgproxy.presentSecrets" -}}
{{- $table := include "pgproxy.secretTable" . | fromYaml }}
{{- $known := list }}
{{- range $field, $entry := $table }}{{ $known = append $known $entry.key }}{{ end }}
{{- $present := list }}
{{- if .Values.secrets.existingSecret }}
{{- range $key := .Values.secrets.existingSecretKeys }}
{{- if not (has $key $known) }}
{{- fail (printf "secrets.existingSecretKeys: unknown key %q (known: %s)" $key (join ", " (sortAlpha $known))) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $field := keys $table | sortAlpha }}
{{- $entry := get $table $field }}
{{- $set := false }}
{{- if $.Values.secrets.existingSecret }}
{{- $set = has $entry.key $.Values.secrets.existingSecretKeys }}
{{- else }}
{{- $set = not (empty (get $.Values.secrets $field)) }}
{{- end }}
{{- if $set }}
{{- $present = append $present (merge (dict "field" $field) $entry) }}
{{- end }}
{{- end }}
{{- toYaml (dict "secrets" $present) }}
{{- end }}

{{- define "pgproxy.secretName" -}}
{{- default (include "pgproxy.fullname" .) .Values.secrets.existingSecret }}
{{- end }}

{{/* Sets the dotted `path` in `dict` to `value`, making the tables on the way. */}}
{{- define "pgproxy.setPath" -}}
{{- $node := .dict }}
{{- $parts := splitList "." .path }}
{{- range $part := initial $parts }}
{{- if not (kindIs "map" (get $node $part)) }}
{{- $_ := set $node $part dict }}
{{- end }}
{{- $node = get $node $part }}
{{- end }}
{{- $_ := set $node (last $parts) .value }}
{{- end }}

{{/* The kind of the value at the dotted `path` in `dict` (kindOf: map, string, ...), or
"missing". */}}
{{- define "pgproxy.kindAt" -}}
{{- $node := .dict }}
{{- $kind := "map" }}
{{- range $part := splitList "." .path }}
{{- if and (eq $kind "map") (hasKey $node $part) }}
{{- $node = index $node $part }}
{{- $kind = kindOf $node }}
{{- else }}
{{- $kind = "missing" }}
{{- end }}
{{- end }}
{{- $kind }}
{{- end }}

{{/* The string at the dotted `path` in `dict`, or "" when there is none. */}}
{{- define "pgproxy.stringAt" -}}
{{- $node := .dict }}
{{- range $part := splitList "." .path }}
{{- if kindIs "map" $node }}{{ $node = get $node $part }}{{ else }}{{ $node = "" }}{{ end }}
{{- end }}
{{- if kindIs "string" $node }}{{ $node }}{{ end }}
{{- end }}

{{/* Helm reads every number in values.yaml as a float, and toToml writes a whole float as
20.0, which pgproxy refuses for its integer options (pool_size = 20.0). Whole numbers become
integers here, in place; pgproxy takes an integer for its decimal options too. */}}
{{- define "pgproxy.wholeNumbers" -}}
{{- $table := . }}
{{- range $key, $value := $table }}
{{- if and (kindIs "float64" $value) (eq $value (floor $value)) }}
{{- $_ := set $table $key (int64 $value) }}
{{- else if kindIs "map" $value }}
{{- include "pgproxy.wholeNumbers" $value }}
{{- else if kindIs "slice" $value }}
{{- $items := list }}
{{- range $item := $value }}
{{- if kindIs "map" $item }}
{{- include "pgproxy.wholeNumbers" $item }}
{{- $items = append $items $item }}
{{- else if and (kindIs "float64" $item) (eq $item (floor $item)) }}
{{- $items = append $items (int64 $item) }}
{{- else }}
{{- $items = append $items $item }}
{{- end }}
{{- end }}
{{- $_ := set $table $key $items }}
{{- end }}
{{- end }}
{{- end }}

{{/* pgproxy.toml: .Values.config with the keys the chart owns. */}}
{{- define "pgproxy.configToml" -}}
{{- $cfg := deepCopy (.Values.config | default dict) }}
{{- range $path := list "server.listen" "http.listen" "audit.file" "control" }}
{{- if ne (include "pgproxy.kindAt" (dict "dict" $cfg "path" $path)) "missing" }}
{{- fail (printf "config.%s: set by the chart (ports, listenAddress, auditVolume, control.settings); remove it from config" $path) }}
{{- end }}
{{- end }}
{{- $listen := list (printf "%s:%d" .Values.listenAddress (int .Values.ports.clients)) }}
{{- range $extra := .Values.ports.extraClients }}
{{- $listen = append $listen (printf "%s:%d" $.Values.listenAddress (int $extra.port)) }}
{{- end }}
{{- include "pgproxy.setPath" (dict "dict" $cfg "path" "server.listen" "value" $listen) }}
{{- include "pgproxy.setPath" (dict "dict" $cfg "path" "http.listen" "value" (printf "%s:%d" .Values.listenAddress (int .Values.ports.http))) }}
{{- include "pgproxy.setPath" (dict "dict" $cfg "path" "audit.file" "value" (printf "%s/audit.jsonl" (include "pgproxy.dataDir" .))) }}
{{- if .Values.control.enabled }}
{{- $_ := set $cfg "control" (deepCopy (.Values.control.settings | default dict)) }}
{{- end }}
{{- if .Values.tls.secretName }}
{{- include "pgproxy.setPath" (dict "dict" $cfg "path" "server.tls_cert_file" "value" (printf "%s/tls.crt" (include "pgproxy.tlsDir" .))) }}
{{- include "pgproxy.setPath" (dict "dict" $cfg "path" "server.tls_key_file" "value" (printf "%s/tls.key" (include "pgproxy.tlsDir" .))) }}
{{- end }}
{{- range $secret := (include "pgproxy.presentSecrets" . | fromYaml).secrets }}
{{- if and $secret.needs (ne (include "pgproxy.kindAt" (dict "dict" $cfg "path" $secret.needs)) "map") }}
{{- fail (printf "secrets: %s is set but %s is not configured" $secret.key (ternary "control.enabled" (printf "config.%s" $secret.needs) (eq $secret.needs "control"))) }}
{{- end }}
{{- $env := printf "%s_env" (trimSuffix "_file" $secret.option) }}
{{- if include "pgproxy.stringAt" (dict "dict" $cfg "path" $env) }}
{{- fail (printf "config.%s: the secret %s sets %s; pgproxy takes one of the two" $env $secret.key $secret.option) }}
{{- end }}
{{- include "pgproxy.setPath" (dict "dict" $cfg "path" $secret.option "value" (printf "%s/%s" (include "pgproxy.secretsDir" $) $secret.key)) }}
{{- end }}
{{- include "pgproxy.wholeNumbers" $cfg }}
{{- toToml $cfg }}
{{- end }}

{{/* terminationGracePeriodSeconds: the preStop pause, then shutdown_timeout_s for the sessions,
then time for the audit trail's last flush. */}}
{{- define "pgproxy.terminationGrace" -}}
{{- $shutdown := 30.0 }}
{{- $server := .Values.config.server | default dict }}
{{- if hasKey $server "shutdown_timeout_s" }}{{ $shutdown = float64 $server.shutdown_timeout_s }}{{ end }}
{{- add (int .Values.lifecycle.preStopSleepSeconds) (int (ceil $shutdown)) (int .Values.lifecycle.extraGraceSeconds) }}
{{- end }}
