#!/usr/bin/env bash
# Real SFTP clients for wings' SFTP tests and benchmark: OpenSSH's sftp (batch mode), sshd and
# its sftp-server (the benchmark's baseline), sshfs (FUSE) and Python paramiko.
# Idempotent: installs only what is missing. Run as root.
set -euo pipefail
missing=()
command -v sftp >/dev/null || missing+=(openssh-client)
command -v sshfs >/dev/null || missing+=(sshfs)
[ -x /usr/lib/openssh/sftp-server ] || missing+=(openssh-sftp-server)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v fusermount3 >/dev/null || command -v fusermount >/dev/null || missing+=(fuse3)
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # Installing openssh-server must not start a system sshd on port 22.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
python3 -c 'import paramiko' 2>/dev/null \
  || python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore 'paramiko>=3.4,<6'
