#!/usr/bin/env bash
# Installs the pjdfstest POSIX conformance suite (crates.io `pjdfstest`, the Rust
# rewrite of the FreeBSD suite) under target/pjdfstest, the fsx file system exerciser
# under target/fsx, and the second user the suite switches to (`tests`) if the machine
# has none. The test
# `fuse::posix_conformance_suite` (tests/cli/fuse.rs) then runs it against a real
# mount, as root, and `fuse::fsx_with_m_nodes_killed_and_restarted` runs fsx:
#
#   bash tests/posix/install.sh
#   cargo test -p drs-cli --test cli -- fuse::posix_conformance_suite
set -euo pipefail
cd "$(dirname "$0")/../.."
PJDFSTEST_VERSION=0.2.2
tools="${CARGO_TARGET_DIR:-$PWD/target}/pjdfstest"
# Its ACL crate (exacl) may want libacl's headers and library (Debian: libacl1-dev).
if [ ! -e /usr/include/sys/acl.h ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq libacl1-dev >/dev/null 2>&1 \
        || { apt-get update -qq && apt-get install -y -qq libacl1-dev; }
fi
if ! "$tools/bin/pjdfstest" --version 2>/dev/null | grep -q "$PJDFSTEST_VERSION"; then
    cargo install --quiet --locked --force --version "$PJDFSTEST_VERSION" --root "$tools" pjdfstest
fi
# fsx, the File System eXerciser (crates.io `fsx`, the Rust rewrite of the fsx of
# Apple, FreeBSD and xfstests), for `fuse::fsx_with_m_nodes_killed_and_restarted`.
FSX_VERSION=0.3.2
fsx_root="${CARGO_TARGET_DIR:-$PWD/target}/fsx"
if ! "$fsx_root/bin/fsx" --version 2>/dev/null | grep -q "$FSX_VERSION"; then
    cargo install --quiet --locked --force --version "$FSX_VERSION" --root "$fsx_root" fsx
fi
if ! id tests >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        echo 'tests:x:::pjdfstest user:/:/usr/sbin/nologin' | newusers
    else
        echo "no user 'tests': run this as root to add it" >&2
    fi
fi
"$tools/bin/pjdfstest" --version
"$fsx_root/bin/fsx" --version
