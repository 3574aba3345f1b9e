#!/usr/bin/env bash
# One-time AWS set-up that cluster.yaml relies on (README "Run on a cluster"). Idempotent: run
# it again after changing ADMIN_CIDR. It creates, in the VPC of your EFS file system:
#   - security group cspine-ray-nodes (every node): SSH from ADMIN_CIDR only, all traffic
#     between the cluster's own nodes, nothing else in;
#   - security group cspine-ray-efs (the EFS mount targets): NFS from cspine-ray-nodes only;
#   - an EFS file-system policy that refuses NFS without TLS;
#   - IAM role + instance profile cspine-ray-head with head-policy.json: launch, tag, stop and
#     terminate this cluster's instances and nothing else (workers get no role at all).
# and prints the two values to put in cluster.yaml's `# CHANGE ME` lines.
#
#   ADMIN_CIDR=203.0.113.7/32 EFS_ID=fs-0123456789abcdef0 REGION=us-west-2 bash aws/setup.sh
set -euo pipefail

: "${ADMIN_CIDR:?set ADMIN_CIDR to the range you run ray up from, e.g. your address/32}"  # CHANGE ME
: "${EFS_ID:?set EFS_ID to the EFS file system id (fs-...)}"
REGION=${REGION:-us-west-2}
case "$ADMIN_CIDR" in
  */0|0.0.0.0*|::/*) echo "aws/setup.sh: refusing a world-open SSH range ($ADMIN_CIDR)" >&2; exit 1;;
  */*) ;;
  *) echo "aws/setup.sh: ADMIN_CIDR must be a CIDR such as 203.0.113.7/32" >&2; exit 1;;
esac

here=$(cd "$(dirname "$0")" && pwd)
awsq() { aws --region "$REGION" --output text "$@"; }

ACCOUNT_ID=$(awsq sts get-caller-identity --query Account)
VPC_ID=$(awsq efs describe-mount-targets --file-system-id "$EFS_ID" --query 'MountTargets[0].VpcId')
[ -n "$VPC_ID" ] && [ "$VPC_ID" != "None" ] || {
  echo "aws/setup.sh: $EFS_ID has no mount target in $REGION (create one per availability zone)" >&2; exit 1; }
CLUSTER_SG=""

render() {  # a template of this folder with the ${...} placeholders filled in
  sed -e "s|\${REGION}|$REGION|g" -e "s|\${ACCOUNT_ID}|$ACCOUNT_ID|g" -e "s|\${EFS_ID}|$EFS_ID|g" \
      -e "s|\${CLUSTER_SG}|$CLUSTER_SG|g" -e "s|\${ADMIN_CIDR}|$ADMIN_CIDR|g" "$here/$1"
}

group() {  # name description -> group id, created on the first run
  local id
  id=$(awsq ec2 describe-security-groups --query 'SecurityGroups[0].GroupId' \
       --filters "Name=vpc-id,Values=$VPC_ID" "Name=group-name,Values=$1")
  if [ -z "$id" ] || [ "$id" = "None" ]; then
    id=$(awsq ec2 create-security-group --vpc-id "$VPC_ID" --group-name "$1" \
         --description "$2" --query GroupId)
  fi
  echo "$id"
}

allow() {  # group-id template: add the template's ingress rules; existing ones are fine
  local err
  if ! err=$(awsq ec2 authorize-security-group-ingress --group-id "$1" \
             --ip-permissions "$(render "$2")" 2>&1 >/dev/null); then
    case "$err" in *InvalidPermission.Duplicate*) ;; *) echo "$err" >&2; exit 1;; esac
  fi
}

CLUSTER_SG=$(group cspine-ray-nodes "cspine-ray nodes: SSH from the admin range, all traffic between nodes")
EFS_SG=$(group cspine-ray-efs "cspine-ray EFS mount targets: NFS from the cluster nodes only")
allow "$CLUSTER_SG" nodes-ingress.json
allow "$EFS_SG" efs-ingress.json
for mt in $(awsq efs describe-mount-targets --file-system-id "$EFS_ID" --query 'MountTargets[].MountTargetId'); do
  awsq efs modify-mount-target-security-groups --mount-target-id "$mt" --security-groups "$EFS_SG"
done
awsq efs put-file-system-policy --file-system-id "$EFS_ID" --policy "$(render efs-policy.json)" >/dev/null

if ! awsq iam get-role --role-name cspine-ray-head >/dev/null 2>&1; then
  awsq iam create-role --role-name cspine-ray-head \
    --assume-role-policy-document "file://$here/trust-policy.json" >/dev/null
fi
awsq iam put-role-policy --role-name cspine-ray-head --policy-name cspine-ray-head \
  --policy-document "$(render head-policy.json)"
if ! awsq iam get-instance-profile --instance-profile-name cspine-ray-head >/dev/null 2>&1; then
  awsq iam create-instance-profile --instance-profile-name cspine-ray-head >/dev/null
  awsq iam add-role-to-instance-profile --instance-profile-name cspine-ray-head --role-name cspine-ray-head
fi

cat <<DONE
Done. In cluster.yaml, set on every node type:
  SecurityGroupIds: [$CLUSTER_SG]
and on the head node type:
  IamInstanceProfile: {Arn: arn:aws:iam::$ACCOUNT_ID:instance-profile/cspine-ray-head}
DONE
