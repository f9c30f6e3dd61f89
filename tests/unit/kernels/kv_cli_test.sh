#!/bin/sh
# kvgate kv roundtrip / attention checked from outside with NumPy (skips, exit 77, without it).
# usage: kv_cli_test.sh KVGATE_BINARY CHECK_SCRIPT
if ! /usr/bin/python3 -c 'import numpy' 2>/dev/null; then
  echo "SKIPPED: /usr/bin/python3 with numpy not available"
  exit 77
fi
exec /usr/bin/python3 "$2" "$1"
