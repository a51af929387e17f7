#!/usr/bin/env bash
# Make the TLS certificates and SuperNode keys for a secure Flower deployment.
#
#   experiments/deploy/make_certs.sh OUT_DIR [NODE_NAME ...]
#
# Writes, into OUT_DIR (created if missing):
#   ca.key, ca.crt          a private certificate authority (EC secp384r1, self-signed)
#   server.key, server.pem  the SuperLink's certificate, signed by that CA, for the names in $SAN
#   keys/NAME, keys/NAME.pub  one SuperNode key pair per NODE_NAME (default: node-0 node-1)
#
# Then:
#   SuperLink:  --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key
#               (and --enable-supernode-auth)
#   SuperNode:  --root-certificates ca.crt --auth-supernode-private-key keys/NAME
#   flwr CLI:   root-certificates = ".../ca.crt" in the connection of $FLWR_HOME/config.toml
#   Register:   flwr supernode register keys/NAME.pub <connection>
#
# Key formats (read from flwr 1.42's source): `--auth-supernode-private-key` is loaded with
# cryptography's load_ssh_private_key, so it must be an OpenSSH private key
# ("-----BEGIN OPENSSH PRIVATE KEY-----", no passphrase) holding an EC key; `flwr supernode
# register` loads the public key with load_ssh_public_key and accepts NIST curves only
# ("ecdsa-sha2-nistp384 AAAA..."). openssl writes neither format, so the node keys come from
# ssh-keygen (ECDSA, 384 bits = secp384r1); without ssh-keygen, from Python's `cryptography`
# (a Flower dependency; $PYTHON, default python3).
#
# Environment:
#   SAN   subjectAltName of the server certificate (default "IP:127.0.0.1,DNS:localhost").
#         A SuperNode checks the name it dials against it: on a real network add the server's
#         address, e.g. SAN="IP:127.0.0.1,IP:192.168.1.10,DNS:flower.lan".
#   DAYS  validity in days (default 365).
#
# Existing files are never overwritten: the script refuses, so a CA in use is not replaced by
# accident. Keep ca.key and the keys/NAME private keys secret (they are written mode 600); only
# ca.crt and keys/NAME.pub are meant to be copied around.
set -euo pipefail

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
    sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ? 2 : 0 ))
fi
OUT="$1"; shift
NODES=("$@")
[[ ${#NODES[@]} -gt 0 ]] || NODES=(node-0 node-1)
SAN="${SAN:-IP:127.0.0.1,DNS:localhost}"
DAYS="${DAYS:-365}"
PYTHON="${PYTHON:-python3}"

for name in "${NODES[@]}"; do
    [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "bad node name: $name" >&2; exit 2; }
done
mkdir -p "$OUT/keys"
for f in ca.key ca.crt server.key server.pem; do
    [[ ! -e "$OUT/$f" ]] || { echo "$OUT/$f exists; refusing to overwrite" >&2; exit 1; }
done
for name in "${NODES[@]}"; do
    [[ ! -e "$OUT/keys/$name" ]] || { echo "$OUT/keys/$name exists; refusing to overwrite" >&2; exit 1; }
done

umask 077
cd "$OUT"

# Certificate authority.
openssl ecparam -name secp384r1 -genkey -noout -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -sha384 -days "$DAYS" -subj "/CN=fedpeft deployment CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.crt

# SuperLink server certificate, signed by the CA, valid for $SAN.
openssl ecparam -name secp384r1 -genkey -noout -out server.key 2>/dev/null
openssl req -new -key server.key -subj "/CN=fedpeft superlink" -out server.csr
cat > server.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EOF
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha384 -days "$DAYS" \
    -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
openssl verify -CAfile ca.crt server.pem >/dev/null

# SuperNode key pairs (OpenSSH format, ECDSA secp384r1).
for name in "${NODES[@]}"; do
    if command -v ssh-keygen >/dev/null 2>&1; then
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "keys/$name"
    else
        "$PYTHON" - "keys/$name" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization as s
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
path = sys.argv[1]
open(path, "wb").write(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.OpenSSH, s.NoEncryption()))
open(path + ".pub", "wb").write(key.public_key().public_bytes(s.Encoding.OpenSSH, s.PublicFormat.OpenSSH) + b"\n")
EOF
    fi
done
chmod 644 ca.crt server.pem keys/*.pub
echo "wrote $(pwd): ca.crt server.pem server.key, keys: ${NODES[*]}"
