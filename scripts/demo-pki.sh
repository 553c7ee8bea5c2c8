# Sourced by the demo scripts: a throwaway CA, certificates it issues, and
# the Kubernetes Secrets that carry them. EC P-256, valid for 30 days.

# pki_init DIR: a CA in DIR/ca.{key,crt}.
pki_init() {
  pki_dir=$1
  mkdir -p "$pki_dir"
  pki_key "$pki_dir/ca.key"
  openssl req -x509 -new -key "$pki_dir/ca.key" -days 30 -subj "/CN=pingress demo CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
    -out "$pki_dir/ca.crt"
}

pki_key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

# pki_issue NAME SUBJECT EXTENSIONS: DIR/NAME.{key,crt} signed by the CA.
pki_issue() {
  pki_key "$pki_dir/$1.key"
  openssl req -new -key "$pki_dir/$1.key" -subj "$2" -out "$pki_dir/$1.csr"
  printf '%b' "$3" > "$pki_dir/$1.ext"
  openssl x509 -req -in "$pki_dir/$1.csr" -CA "$pki_dir/ca.crt" -CAkey "$pki_dir/ca.key" \
    -CAcreateserial -days 30 -extfile "$pki_dir/$1.ext" -out "$pki_dir/$1.crt" 2>/dev/null
}

# pki_tls_secret SECRET NAME: a kubernetes.io/tls Secret of DIR/NAME.
pki_tls_secret() {
  cat <<YAML
---
apiVersion: v1
kind: Secret
metadata:
  name: $1
type: kubernetes.io/tls
data:
  tls.crt: $(base64 -w0 < "$pki_dir/$2.crt")
  tls.key: $(base64 -w0 < "$pki_dir/$2.key")
YAML
}

# pki_ca_secret SECRET: an Opaque Secret with the CA under tls.crt.
pki_ca_secret() {
  cat <<YAML
---
apiVersion: v1
kind: Secret
metadata:
  name: $1
type: Opaque
data:
  tls.crt: $(base64 -w0 < "$pki_dir/ca.crt")
YAML
}
