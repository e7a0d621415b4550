#!/usr/bin/env bash
# Certificates and keys for a Flower 1.39 deployment with TLS and SuperNode authentication
# (openssl and ssh-keygen only):
#
#   scripts/make_certs.sh [OUT_DIR] [NUM_NODES] [EXTRA_SAN ...]
#   scripts/make_certs.sh                      # certs/, 3 node key pairs
#   scripts/make_certs.sh certs 5 superlink.example.org 10.0.0.7
#
# OUT_DIR (default certs/, git-ignored) receives
#   ca.crt, ca.key        a private certificate authority (keep ca.key offline)
#   server.pem, server.key  the SuperLink's certificate (SANs: localhost, 127.0.0.1, ::1, the compose
#                           service name `superlink`, plus every EXTRA_SAN: a DNS name or an IP address)
#   keys/site-<i>, keys/site-<i>.pub   one ECDSA P-384 key pair per SuperNode, OpenSSH format
#                           (Flower reads only OpenSSH-format EC keys; an openssl PEM key is rejected)
#   superexec.secret        a random shared secret for SuperExec containers (docker-compose.yml,
#                           --isolation process); not needed for the plain-process deployment
#
# Where they go: the SuperLink gets ca.crt, server.pem, server.key (--ssl-ca-certfile/--ssl-certfile/
# --ssl-keyfile); every SuperNode gets ca.crt (--root-certificates) and ONLY its own private key
# keys/site-<i> (--auth-supernode-private-key); the operator registers each keys/site-<i>.pub with
# `flwr supernode register certs/keys/site-<i>.pub <connection>`; the `flwr` CLI gets ca.crt
# (root-certificates in $FLWR_HOME/config.toml). See docs/DEPLOYMENT.md.
#
# Existing files are kept (re-running adds missing node keys without invalidating the CA or the
# registered keys); delete OUT_DIR to start over. CERT_DAYS sets the validity (default 365),
# CERT_RSA_BITS the RSA size of the CA and SuperLink keys (default 4096).
set -euo pipefail

OUT="${1:-certs}"
NODES="${2:-3}"
shift $(( $# > 2 ? 2 : $# ))
DAYS="${CERT_DAYS:-365}"
BITS="${CERT_RSA_BITS:-4096}"

if ! [[ "$NODES" =~ ^[0-9]+$ ]]; then
    echo "make_certs.sh: NUM_NODES must be a non-negative integer, got '$NODES'" >&2
    exit 2
fi
for tool in openssl ssh-keygen; do
    command -v "$tool" >/dev/null || { echo "make_certs.sh: '$tool' is not installed" >&2; exit 2; }
done

mkdir -p "$OUT/keys"
chmod 700 "$OUT" "$OUT/keys"
umask 077

# ---------------------------------------------------------------- certificate authority
if [[ ! -f "$OUT/ca.crt" || ! -f "$OUT/ca.key" ]]; then
    openssl genrsa -out "$OUT/ca.key" "$BITS" 2>/dev/null
    openssl req -new -x509 -key "$OUT/ca.key" -sha256 -days "$DAYS" \
        -subj "/CN=fedcoe-flwr-ca" -out "$OUT/ca.crt"
    rm -f "$OUT/server.pem"  # a new CA invalidates an older server certificate
    echo "created CA            $OUT/ca.crt"
fi

# ---------------------------------------------------------------- SuperLink certificate
if [[ ! -f "$OUT/server.pem" || ! -f "$OUT/server.key" ]]; then
    sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:superlink"
    for extra in "$@"; do
        if [[ "$extra" =~ ^[0-9.]+$ || "$extra" == *:* ]]; then sans+=",IP:$extra"; else sans+=",DNS:$extra"; fi
    done
    cnf="$OUT/server.cnf"
    cat > "$cnf" <<EOF
[req]
default_md = sha256
prompt = no
distinguished_name = dn
req_extensions = v3_ext
[dn]
CN = localhost
[v3_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $sans
EOF
    openssl genrsa -out "$OUT/server.key" "$BITS" 2>/dev/null
    openssl req -new -key "$OUT/server.key" -out "$OUT/server.csr" -config "$cnf"
    openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" \
        -CAcreateserial -out "$OUT/server.pem" -days "$DAYS" -sha256 \
        -extfile "$cnf" -extensions v3_ext 2>/dev/null
    rm -f "$OUT/server.csr"
    openssl verify -CAfile "$OUT/ca.crt" "$OUT/server.pem" >/dev/null
    echo "created SuperLink cert $OUT/server.pem (SANs: $sans)"
fi

# ---------------------------------------------------------------- SuperNode key pairs
for ((i = 0; i < NODES; i++)); do
    key="$OUT/keys/site-$i"
    if [[ ! -f "$key" || ! -f "$key.pub" ]]; then
        rm -f "$key" "$key.pub"
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "fedcoe-site-$i" -f "$key"
        echo "created node key pair $key(.pub)"
    fi
done

# ---------------------------------------------------------------- SuperExec shared secret (compose)
if [[ ! -f "$OUT/superexec.secret" ]]; then
    openssl rand -base64 32 | tr -d '\n' > "$OUT/superexec.secret"
fi

# Containers run as uid 49999 (the flwr images' `app` user) and must read the files they mount;
# the private keys stay readable by their owner only outside compose (see docs/DEPLOYMENT.md).
chmod 644 "$OUT/ca.crt" "$OUT/server.pem" "$OUT"/keys/*.pub 2>/dev/null || true
chmod 600 "$OUT/ca.key" "$OUT/server.key" 2>/dev/null || true
echo "done: $OUT (CA, SuperLink certificate, $NODES node key pairs)"
