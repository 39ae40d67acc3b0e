#!/usr/bin/env bash
# Validates everything in deploy/ without a Docker engine or a Kubernetes cluster:
# yamllint, the Kubernetes manifests against the Kubernetes schemas
# (kubernetes-validate --strict; the custom resources against field schemas), the
# compose file against the Compose Specification schema, and the cross-references
# between them (deploy/check_deploy.py says what exactly). Offline once the packages
# are installed; needs only python3 with pip.
#
#   bash deploy/check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== installing the checkers (deploy/check-requirements.txt)"
python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore \
  -r deploy/check-requirements.txt

echo "== yamllint deploy/"
python3 -m yamllint --strict -c deploy/.yamllint deploy

# The built-in kinds of the kustomize base, file by file, as its CLI reports them.
mapfile -t manifests < <(python3 -c '
import yaml
for r in yaml.safe_load(open("deploy/k8s/kustomization.yaml"))["resources"]:
    print("deploy/k8s/" + r)
')
for version in 1.29.0 1.37.0; do
  echo "== kubernetes-validate --strict -k $version (deploy/k8s base)"
  python3 -m kubernetes_validate --strict --quiet -k "$version" "${manifests[@]}"
done

python3 deploy/check_deploy.py
