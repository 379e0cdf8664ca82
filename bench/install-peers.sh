#!/usr/bin/env bash
# Installs the peer proxies the benchmark compares Sidewall with, from Debian packages:
# HAProxy, nginx with its stream module, stunnel. Idempotent; needs root (or sudo).
# Usage: bash bench/install-peers.sh
set -euo pipefail

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

$sudo apt-get update -qq

# nginx's stream module: `libnginx-mod-stream` on Debian 11-13 and Ubuntu; some releases
# build it into the `nginx-full`/`nginx-extras` binary instead, or name it differently.
stream=""
for candidate in libnginx-mod-stream nginx-mod-stream; do
    if apt-cache show "$candidate" >/dev/null 2>&1; then stream=$candidate; break; fi
done
nginx=nginx-light
apt-cache show nginx-light >/dev/null 2>&1 || nginx=nginx
packages=(haproxy "$nginx" stunnel4)
if [ -n "$stream" ]; then
    packages+=("$stream")
else
    echo "no separate nginx stream module package here; installing nginx-full (stream built in)" >&2
    packages=(haproxy nginx-full stunnel4)
fi

$sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"

# The packages start system services on the default ports; the benchmark starts its own
# instances with its own configurations, so stop the system ones where a service manager runs.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    $sudo systemctl disable --now haproxy nginx stunnel4 >/dev/null 2>&1 || true
elif command -v service >/dev/null; then
    for s in haproxy nginx stunnel4; do $sudo service "$s" stop >/dev/null 2>&1 || true; done
fi

echo "installed:"
haproxy -v 2>&1 | head -1
nginx -v 2>&1 | head -1
if [ -f /usr/lib/nginx/modules/ngx_stream_module.so ]; then
    echo "nginx stream module: /usr/lib/nginx/modules/ngx_stream_module.so"
else
    nginx -V 2>&1 | grep -q -- '--with-stream' && echo "nginx stream module: built in" \
        || echo "warning: nginx has no stream module; the benchmark will skip nginx" >&2
fi
(stunnel4 -version 2>&1 || stunnel -version 2>&1) | grep -m1 "^stunnel "
