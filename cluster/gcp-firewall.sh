#!/usr/bin/env bash
# The private network for cluster/gcp-gpu.yaml: traffic allowed inside the cluster's subnet, SSH
# from ADMIN_CIDR (your address, e.g. 203.0.113.7/32), nothing else. No Ray port is ever opened to
# the internet; reach the dashboard with `ray dashboard cluster/gcp-gpu.yaml` (an SSH tunnel).
#
#   ADMIN_CIDR=203.0.113.7/32 PROJECT=your-gcp-project bash cluster/gcp-firewall.sh
set -euo pipefail
: "${PROJECT:?set PROJECT to your GCP project id}"
: "${ADMIN_CIDR:?set ADMIN_CIDR to the address range allowed to SSH in, e.g. 203.0.113.7/32}"
case "$ADMIN_CIDR" in 0.0.0.0/0|::/0) echo "ADMIN_CIDR must not be the whole internet" >&2; exit 1;; esac
REGION=${REGION:-us-central1}
SUBNET_RANGE=10.42.0.0/20

gcloud compute networks create alexnet-ray --project "$PROJECT" --subnet-mode custom
gcloud compute networks subnets create alexnet-ray-subnet --project "$PROJECT" \
    --network alexnet-ray --region "$REGION" --range "$SUBNET_RANGE"
gcloud compute firewall-rules create alexnet-ray-internal --project "$PROJECT" \
    --network alexnet-ray --direction INGRESS --allow tcp,udp,icmp --source-ranges "$SUBNET_RANGE"
gcloud compute firewall-rules create alexnet-ray-ssh --project "$PROJECT" \
    --network alexnet-ray --direction INGRESS --allow tcp:22 --source-ranges "$ADMIN_CIDR"
