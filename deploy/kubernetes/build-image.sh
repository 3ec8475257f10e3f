#!/bin/bash
# make image: xlb's container image built for real with no registry (none is reachable here),
# then run on the DaemonSet's ConfigMap configuration.
#
#   deploy/kubernetes/build-image.sh [XLB_BINARY]
#
# 1. A Debian 12 base root made locally with mmdebstrap (from the Debian mirror, the one package
#    source there is), imported as localhost/xlb-base:bookworm; reused when it exists.
# 2. localhost/xlb:VERSION from deploy/kubernetes/Containerfile.prebuilt with the host's binary.
# 3. The image runs `xlb check` on the ConfigMap's xlb.yaml, mounted at /etc/xlb as Kubernetes
#    mounts it, with no network; and on a broken copy, which must be refused.
# Prints SKIPPED with the reason, and succeeds, where no container tool can be installed or
# run (no podman package, a kernel or cgroup setup on which the OCI runtime cannot start even
# the image's `xlb --version`); any failure after that is the image's, and fails.
set -euo pipefail
cd "$(dirname "$0")/../.."
XLB=${1:-target/release/xlb}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
BASE=localhost/xlb-base:bookworm
IMAGE=localhost/xlb:$VERSION
WORK=target/image

skip() { echo "image: SKIPPED: $*"; exit 0; }
command -v podman >/dev/null || skip "podman is not installed and could not be (make deps IMAGE=1)"
command -v mmdebstrap >/dev/null || skip "mmdebstrap is not installed and could not be"
[ -x "$XLB" ] || { echo "image: no binary at $XLB (make build first)" >&2; exit 1; }
podman info >/dev/null 2>&1 || skip "podman cannot run here: $(podman info 2>&1 | tail -1)"

rm -rf "$WORK" && mkdir -p "$WORK/context" "$WORK/etc-xlb" "$WORK/broken"
if ! podman image exists "$BASE"; then
  echo "image: making the base $BASE with mmdebstrap"
  mmdebstrap --quiet --variant=minbase --include=libelf1,zlib1g,iproute2,nftables \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' bookworm "$WORK/base.tar"
  podman import --quiet "$WORK/base.tar" "$BASE" >/dev/null
  rm -f "$WORK/base.tar"
fi
cp "$XLB" "$WORK/context/xlb"
podman build --quiet --network=none --build-arg "BASE=$BASE" \
  -f deploy/kubernetes/Containerfile.prebuilt -t "$IMAGE" "$WORK/context" >/dev/null
echo "image: built $IMAGE, $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"

# The ConfigMap's configuration, as the DaemonSet mounts it.
python3 - "$WORK" <<'PY'
import sys, yaml
work = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open("deploy/kubernetes/xlb.yaml")) if d]
text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["xlb.yaml"]
open(f"{work}/etc-xlb/xlb.yaml", "w").write(text)
open(f"{work}/broken/xlb.yaml", "w").write(text.replace("interfaces:", "interfaces: 7\nnot_a_field:", 1))
PY
# runc where installed: crun refuses a hybrid cgroup hierarchy (v1 controllers beside a v2
# mount), as on some VMs. Limits below the defaults' maxima: raising them needs a privilege a
# nested container may lack, and `xlb check` needs neither.
RUNTIME=()
command -v runc >/dev/null && RUNTIME=(--runtime runc)
container() {
  podman "${RUNTIME[@]}" run --rm --network=none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 "$@"
}
run() { container -v "$PWD/$1:/etc/xlb:ro" "$IMAGE" check --config /etc/xlb/xlb.yaml; }
# Whether this machine can run a container at all (the OCI runtime's own refusal is the
# machine's, not the image's): the binary's version, which needs nothing.
version=$(container "$IMAGE" --version 2>&1) ||
  skip "podman cannot run a container on this machine: $(echo "$version" | tail -1)"
echo "image: runs: $version"
out=$(run "$WORK/etc-xlb" 2>&1) || { echo "$out" >&2; echo "image: xlb check refused the ConfigMap's configuration" >&2; exit 1; }
echo "$out" | sed 's/^/image: xlb check: /'
if out=$(run "$WORK/broken" 2>&1); then
  echo "$out" >&2; echo "image: xlb check in the image accepted a broken configuration" >&2; exit 1
fi
echo "image: a broken configuration is refused in the image: $(echo "$out" | head -1)"
echo "image: ok"
