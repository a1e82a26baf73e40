#!/usr/bin/env bash
# Cross-compile the workspace for aarch64-unknown-linux-gnu with Debian's
# rustc-web toolchain and run its tests under qemu-user, so that the NEON
# paths are compiled and executed for real on this x86_64 machine.
#
# Binaries are linked statically: dynamically linked ones hang at the first
# thread under qemu here, static ones run rayon fine.
#
# Usage: scripts/test-aarch64.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
if ! dpkg -s libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user rustc-web cargo-web >/dev/null 2>&1; then
    echo "installing the aarch64 cross toolchain (Debian packages)..."
    $SUDO dpkg --add-architecture arm64
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu \
        libc6-dev-arm64-cross qemu-user >/dev/null
fi

export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64
# The CLI tests spawn the `nibble` binary themselves: run it through qemu too.
export NIBBLE_TEST_RUNNER=qemu-aarch64
# A separate target dir: the host build scripts are compiled by a different rustc.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_AARCH64:-target/aarch64-cross}"
export NIBBLE_SHARED="${NIBBLE_SHARED:-$(cd .. && pwd)/shared}"

/usr/bin/cargo test --workspace --no-fail-fast --target aarch64-unknown-linux-gnu "$@"
