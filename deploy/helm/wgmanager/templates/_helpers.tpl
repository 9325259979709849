{{/*
Names and labels, the usual way: fullname is "<release>-wgmanager" unless the release name
already contains the chart name; everything is truncated to 63 characters (DNS labels).
*/}}
{{- define "wgmanager.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wgmanager.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "wgmanager.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "wgmanager.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wgmanager.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "wgmanager.labels" -}}
helm.sh/chart: {{ include "wgmanager.chart" . }}
{{ include "wgmanager.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wgmanager
{{- end }}

{{- define "wgmanager.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wgmanager.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wgmanager.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/*
system-node-critical keeps the agent from being evicted under node pressure (a node whose
agent is gone stops getting peer updates). Every cluster admits it in kube-system; some
restrict it elsewhere with a ResourceQuota, so elsewhere it is only used when asked for.
*/}}
{{- define "wgmanager.priorityClassName" -}}
{{- if .Values.priorityClassName }}
{{- .Values.priorityClassName }}
{{- else if eq .Release.Namespace "kube-system" }}
{{- "system-node-critical" }}
{{- end }}
{{- end }}

{{/* Host paths, in one place: the agent, wireguard-go and teardown must agree on them. */}}
{{- define "wgmanager.stateDir" -}}/var/lib/wgmanager{{- end }}
{{- define "wgmanager.socketDir" -}}/var/run/wireguard{{- end }}
{{- define "wgmanager.bpffs" -}}/sys/fs/bpf{{- end }}
{{- define "wgmanager.pinDir" -}}/sys/fs/bpf/wgmanager{{- end }}

{{- define "wgmanager.rotationListenPort" -}}
{{- $wg := .Values.encryption.wireguard }}
{{- if kindIs "invalid" $wg.rotationListenPort }}
{{- add (int $wg.listenPort) 1 }}
{{- else }}
{{- int $wg.rotationListenPort }}
{{- end }}
{{- end }}

{{/* userspaceFallback -> the agent's --backend; a wireguard-go DaemonSet unless "never". */}}
{{- define "wgmanager.backend" -}}
{{- get (dict "auto" "auto" "always" "userspace" "never" "kernel") .Values.encryption.wireguard.userspaceFallback }}
{{- end }}

{{- define "wgmanager.wireguardGo" -}}
{{- if ne .Values.encryption.wireguard.userspaceFallback "never" }}true{{- end }}
{{- end }}

{{/*
Checks values.schema.json cannot express; each failure is one line naming the fix.
Included by templates/validate.yaml, so it runs whatever else is enabled.
*/}}
{{- define "wgmanager.validate" -}}
{{- $wg := .Values.encryption.wireguard }}
{{- if .Values.encryption.nodeEncryption }}
{{- fail "encryption.nodeEncryption=true is not supported: this version of wgmanager encrypts pod-to-pod traffic only; set encryption.nodeEncryption=false" }}
{{- end }}
{{- $rotation := int (include "wgmanager.rotationListenPort" .) }}
{{- if gt $rotation 65535 }}
{{- fail "encryption.wireguard.listenPort is 65535, so the default rotationListenPort (listenPort + 1) is not a port; set encryption.wireguard.rotationListenPort" }}
{{- end }}
{{- if eq $rotation (int $wg.listenPort) }}
{{- fail "encryption.wireguard.rotationListenPort equals listenPort; key rotation runs both devices at once, so choose another port" }}
{{- end }}
{{- if and .Values.metrics.enabled (eq (int .Values.metrics.port) (int .Values.health.port)) }}
{{- fail "metrics.port equals health.port; choose two different ports" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.enabled) }}
{{- fail "metrics.serviceMonitor.enabled=true needs metrics.enabled=true" }}
{{- end }}
{{- if and .Values.teardown.enabled .Values.encryption.enabled }}
{{- fail "teardown.enabled=true removes what the agent maintains; set encryption.enabled=false with it (see docs/install.md, Uninstall)" }}
{{- end }}
{{- if and .Values.encryption.enabled (not .Values.serviceAccount.create) (not .Values.serviceAccount.name) }}
{{- fail "serviceAccount.create=false needs serviceAccount.name: the existing ServiceAccount the agent runs as" }}
{{- end }}
{{- end }}

{{/*
The agent's command line. Global flags come before the subcommand; every flag the chart
controls is explicit, so the values (not the agent's defaults) are the whole configuration.
The chart's tests parse exactly this list with the agent's own argument parser.
*/}}
{{- define "wgmanager.agentArgs" -}}
{{- $wg := .Values.encryption.wireguard -}}
- {{ printf "--log-level=%s" .Values.agent.logLevel | quote }}
- {{ printf "--log-format=%s" .Values.agent.logFormat | quote }}
- agent
- {{ printf "--state-dir=%s" (include "wgmanager.stateDir" .) | quote }}
- {{ printf "--interface=%s" $wg.interface | quote }}
- {{ printf "--listen-port=%d" (int $wg.listenPort) | quote }}
- {{ printf "--rotation-listen-port=%s" (include "wgmanager.rotationListenPort" .) | quote }}
{{- if ne (toString $wg.mtu) "auto" }}
- {{ printf "--mtu=%d" (int $wg.mtu) | quote }}
{{- end }}
- {{ printf "--persistent-keepalive=%d" (int $wg.persistentKeepalive) | quote }}
- {{ printf "--fail-mode=%s" (ternary "closed" "open" .Values.encryption.failClosed) | quote }}
- {{ printf "--key-rotation-interval=%s" (toString .Values.encryption.keyRotationInterval) | quote }}
- {{ printf "--backend=%s" (include "wgmanager.backend" .) | quote }}
{{- if include "wgmanager.wireguardGo" . }}
- "--no-spawn-userspace"
{{- end }}
- {{ printf "--socket-dir=%s" (include "wgmanager.socketDir" .) | quote }}
- {{ printf "--pin-dir=%s" (include "wgmanager.pinDir" .) | quote }}
{{- with .Values.clusterPodCIDRs }}
- {{ printf "--cluster-cidrs=%s" (join "," .) | quote }}
{{- end }}
{{- with .Values.podInterfaces }}
- {{ printf "--pod-interfaces=%s" . | quote }}
{{- end }}
{{- with .Values.uplink }}
- {{ printf "--uplink=%s" . | quote }}
{{- end }}
- {{ printf "--health-port=%d" (int .Values.health.port) | quote }}
- {{ printf "--metrics-port=%d" (ternary (int .Values.metrics.port) 0 .Values.metrics.enabled) | quote }}
{{- if and .Values.metrics.enabled .Values.metrics.perPeer }}
- "--metrics-per-peer"
{{- end }}
{{- if not .Values.agent.events }}
- "--no-events"
{{- end }}
{{- if .Values.nodeIdentity.enabled }}
- {{ printf "--node-kubeconfig=%s" .Values.nodeIdentity.kubeletKubeconfig | quote }}
{{- end }}
{{- end }}
