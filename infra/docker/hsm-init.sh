#!/bin/sh
# Container entrypoint for keygen: make sure the SoftHSM token exists (config,
# PINs and token under $KLM_HOME, a volume), then run the given command.
# Same layout as infra/stack.sh uses on a bare machine. Creates no keys.
set -eu
home="${KLM_HOME:-/var/lib/klm}"
label="${KLM_HSM_TOKEN_LABEL:-klm}"
mkdir -p "$home/hsm/tokens" "$home/secrets"
chmod 700 "$home/hsm/tokens" "$home/secrets"
conf="${SOFTHSM2_CONF:-$home/hsm/softhsm2.conf}"
cat >"$conf" <<CONF
directories.tokendir = $home/hsm/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
export SOFTHSM2_CONF="$conf"
for f in hsm-pin hsm-so-pin; do
  if [ ! -s "$home/secrets/$f" ]; then
    (umask 077 && od -An -tx1 -N16 /dev/urandom | tr -d ' \n' >"$home/secrets/$f")
  fi
done
if ! softhsm2-util --show-slots | grep -Eq "^ *Label: *$label *\$"; then
  softhsm2-util --init-token --free --label "$label" \
    --pin "$(cat "$home/secrets/hsm-pin")" \
    --so-pin "$(cat "$home/secrets/hsm-so-pin")" >/dev/null
fi
exec "$@"
