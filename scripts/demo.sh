#!/usr/bin/env bash
# scripts/demo.sh — build pdgate and show one P/D request end to end.
#
# Starts dist/sbin/nginx with the demo configuration (nginx-conf/
# pdgate-demo.conf): the proxy on 127.0.0.1:8080 and stand-in prefill/decode
# servers on 127.0.0.1:8101/8201 that report what they received. Sends a chat
# completion and a streaming one, shows what each leg got, then stops nginx
# (--keep leaves it running for your own curl).
set -euo pipefail
cd "$(dirname "$0")/.."
KEEP=0
[ "${1:-}" = "--keep" ] && KEEP=1

./build.sh
DIST=$(pwd)/dist
NGINX="$DIST/sbin/nginx"
"$NGINX" -p "$DIST" -c conf/nginx.conf -s stop 2>/dev/null && sleep 0.5 || true
"$NGINX" -p "$DIST" -c conf/nginx.conf
[ "$KEEP" = 1 ] || trap '"$NGINX" -p "$DIST" -c conf/nginx.conf -s stop' EXIT
sleep 0.5

REQ='{"model":"demo","messages":[{"role":"user","content":"Say hello"}],"max_tokens":64,"stream":false}'
echo
echo "\$ curl -s 127.0.0.1:8080/v1/chat/completions -d '$REQ'"
ANSWER=$(curl -s --fail-with-body 127.0.0.1:8080/v1/chat/completions -d "$REQ")
python3 - "$ANSWER" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
kv = d["json"]["kv_transfer_params"]
p = kv.pop("prefill_request")
print("\n1) the prefill server received (X-Request-Id %s):" % p["headers"].get("x-request-id"))
print("   POST %s  %s" % (p["uri"], json.dumps(p["json"])))
print("\n2) it answered kv_transfer_params:\n   %s" % json.dumps(kv))
body = json.loads(d["body"])
body["kv_transfer_params"] = "<the object above>"
print("\n3) the decode server received (X-Request-Id %s):" % d["headers"].get("x-request-id"))
print("   POST %s  %s" % (d["uri"], json.dumps(body)))
PY

SREQ='{"model":"demo","messages":[{"role":"user","content":"Say hello"}],"stream":true}'
echo
echo "4) streaming: \$ curl -sN 127.0.0.1:8080/v1/chat/completions -d '$SREQ'"
curl -sN 127.0.0.1:8080/v1/chat/completions -d "$SREQ" | while IFS= read -r line; do
    [ -n "$line" ] && printf '   %s  %s\n' "$(date +%T.%3N)" "${line:0:90}"
done
echo
echo "5) a body that is not JSON:"
curl -s -w '   (HTTP %{http_code})\n' 127.0.0.1:8080/v1/chat/completions -d 'not json' | sed 's/^/   /'
echo
tail -n 3 "$DIST/logs/access.log" | sed 's/^/   access.log: /'
[ "$KEEP" = 1 ] && echo "nginx is still running: $NGINX -p $DIST -c conf/nginx.conf -s stop"
exit 0
