#!/bin/sh
# abc-tvm deploy bundle launcher: ./run.sh IN.npy OUT.npy [--repeat N]
# Runs @MODEL@ with the bundled C++ runner and TVM runtime (no Python, no TVM install).
# Off the board it emulates aarch64 with qemu-aarch64 when that is installed
# (ABC_RUN_EMULATOR overrides the emulator command, ABC_RUN_SYSROOT its library root).
set -u
here=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd)
model="$here/@MODEL@"
fail() {
  echo "abc-run: error: $*" >&2
  exit 2
}
for f in "$here/bin/abc-run" "$here/lib/libtvm_runtime.so" "$here/lib/libtvm_ffi.so" \
         "$model" "$model.json" "$here/SHA256SUMS"; do
  [ -f "$f" ] || fail "$f is missing: copy the whole bundle directory (bin/, lib/, the model and its .json)"
done
# Every file against SHA256SUMS (written by abc-tvm compile --bundle): a corrupted or
# swapped model, manifest, runner or library is refused before anything runs. Without
# sha256sum (a minimal board) bin/abc-run still checks the model against its manifest.
if command -v sha256sum >/dev/null 2>&1; then
  while read -r want name; do
    [ -n "$name" ] || continue
    [ -f "$here/$name" ] || fail "$name (listed in SHA256SUMS) is missing: copy the whole bundle directory"
    have=$(sha256sum "$here/$name" | cut -d ' ' -f 1)
    [ "$want" = "$have" ] || \
      fail "$name does not match its sha256 in SHA256SUMS: the file was changed, corrupted or swapped after the bundle was made; copy the bundle again"
  done < "$here/SHA256SUMS"
fi
emulator=${ABC_RUN_EMULATOR:-}
machine=$(uname -m)
if [ -z "$emulator" ] && [ "$machine" != "@ARCH@" ]; then
  command -v qemu-@ARCH@ >/dev/null 2>&1 || \
    fail "this bundle is for @ARCH@ and this machine is $machine: copy it to the board, or install qemu-user (apt-get install qemu-user) to emulate it"
  sysroot=${ABC_RUN_SYSROOT:-/usr/@ARCH@-linux-gnu}
  [ -f "$sysroot/lib/libc.so.6" ] || \
    fail "qemu-@ARCH@ needs the @ARCH@ C library under $sysroot: apt-get install g++-@ARCH@-linux-gnu (or set ABC_RUN_SYSROOT)"
  emulator="qemu-@ARCH@ -L $sysroot"
fi
# shellcheck disable=SC2086 # the emulator is a command line
exec $emulator "$here/bin/abc-run" "$model" "$@"
