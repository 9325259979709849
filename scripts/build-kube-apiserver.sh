#!/usr/bin/env bash
# Kept for older references: kube-apiserver is now built, with the other Kubernetes
# binaries, by scripts/build-kubernetes.sh (same cache path:
# /var/cache/wgmanager/kube-apiserver-1.20.2/kube-apiserver still works).
exec bash "$(dirname "$0")/build-kubernetes.sh" kube-apiserver
