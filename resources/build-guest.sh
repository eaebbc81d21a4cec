#!/usr/bin/env bash
# Build the Kestrel guest: an uncompressed ELF `vmlinux` and an uncompressed newc
# `initramfs.cpio`, from Debian's linux-source-6.12 and busybox-static.
#
# Usage: resources/build-guest.sh [--deps-only | --print-hash | --help]
#
# Output (stdout, one per line):   vmlinux=<path>   initramfs=<path>
# Progress and errors go to stderr; the quiet build output to <hash dir>/build.log.
#
# Environment:
#   KESTREL_CACHE      cache root (default /var/cache/kestrel)
#   KESTREL_AGENT_BIN  static binary installed as /sbin/kestrel-agent in the initramfs (/init
#                      execs it after the readiness line); its bytes are part of the input
#                      hash. Unset: build resources/agent (cargo, static glibc) into
#                      $KESTREL_CACHE/agent-target/<checkout> and use that; its sources (Cargo.toml,
#                      Cargo.lock, src/, and agent-proto's Cargo.toml and src/) and `rustc -V` are
#                      part of the input hash and cargo runs only on a cache miss. Set but empty:
#                      no agent in the initramfs.
#
# Cache layout (see resources/README.md):
#   $KESTREL_CACHE/guest/<hash16>/{vmlinux,initramfs.cpio,config,build.log}
#   $KESTREL_CACHE/guest/current -> <hash16>
#   $KESTREL_CACHE/build/linux-<version>/pristine        extracted linux-source tarball
#   $KESTREL_CACHE/build/linux-<version>/src, out        patched tree (cp -al) and O= build dir
#   $KESTREL_CACHE/build/linux-<version>/kernel-<khash16>/  built kernel, reused when only the
#                                                          initramfs inputs change
set -euo pipefail

SCRIPT_PATH=$(readlink -f -- "${BASH_SOURCE[0]}")
RES_DIR=$(dirname -- "$SCRIPT_PATH")
GUEST_DIR=$RES_DIR/guest
FRAGMENT=$GUEST_DIR/kernel.config
PATCH_DIR=$GUEST_DIR/patches
INIT_SCRIPT=$GUEST_DIR/init

CACHE=${KESTREL_CACHE:-/var/cache/kestrel}
AGENT_DIR=$RES_DIR/agent
AGENT_TARGET=x86_64-unknown-linux-gnu # static via +crt-static (the musl target is not installed)
if [[ -v KESTREL_AGENT_BIN ]]; then
	AGENT_BIN=$KESTREL_AGENT_BIN
	BUILD_AGENT=0
else
	AGENT_BIN= # set by build_agent on the slow path
	BUILD_AGENT=1
fi

KERNEL_PKG=linux-source-6.12
KERNEL_TARBALL=/usr/src/linux-source-6.12.tar.xz
KERNEL_TOPDIR=linux-source-6.12 # top-level directory inside the tarball
BUSYBOX_PKG=busybox-static
BUSYBOX_BIN=/bin/busybox
PACKAGES=("$KERNEL_PKG" "$BUSYBOX_PKG" build-essential flex bison libelf-dev libssl-dev bc cpio
	xz-utils)
# Fixed mtime of every initramfs entry (reproducible archive): 2024-01-01T00:00:00Z.
CPIO_MTIME=1704067200

log() { printf '[build-guest %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
	printf 'build-guest: error: %s\n' "$*" >&2
	exit 1
}

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SCRIPT_PATH"
}

MODE=build
case "${1:-}" in
"") ;;
--deps-only) MODE=deps ;;
--print-hash) MODE=hash ;;
-h | --help)
	usage
	exit 0
	;;
*)
	usage >&2
	die "unknown argument: $1"
	;;
esac
[[ $# -le 1 ]] || die "at most one option expected"

# ------------------------------------------------------------------ packages
# One dpkg-query for all packages (fast path must stay well under a second).
declare -A PKG_VERSION=()
query_packages() {
	local name status version
	PKG_VERSION=()
	while IFS=$'\t' read -r name status version; do
		[[ $status == "install ok installed" ]] && PKG_VERSION[$name]=$version
	done < <(dpkg-query -W -f='${Package}\t${Status}\t${Version}\n' "${PACKAGES[@]}" 2>/dev/null || true)
}

ensure_deps() {
	command -v dpkg-query >/dev/null || die "this script needs a Debian-based host (dpkg-query not found)"
	query_packages
	local missing=() p
	for p in "${PACKAGES[@]}"; do
		[[ -n ${PKG_VERSION[$p]:-} ]] || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	log "installing missing packages: ${missing[*]}"
	local sudo=()
	if ((EUID != 0)); then
		command -v sudo >/dev/null || die "packages missing (${missing[*]}) and not root; install them or rerun as root"
		sudo=(sudo)
	fi
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 ||
		die "apt-get update failed"
	"${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
		"${missing[@]}" >&2 || die "apt-get install failed (linux-source-6.12 comes from bookworm-security)"
	query_packages
	for p in "${PACKAGES[@]}"; do
		[[ -n ${PKG_VERSION[$p]:-} ]] || die "package $p still not installed"
	done
}

ensure_deps
[[ $MODE == deps ]] && exit 0

[[ $(uname -m) == x86_64 ]] || die "the guest is x86_64 and is built natively; host is $(uname -m)"
[[ -f $FRAGMENT && -f $INIT_SCRIPT ]] || die "missing $FRAGMENT or $INIT_SCRIPT"
[[ $CACHE != *[[:space:]]* ]] || die "KESTREL_CACHE must not contain whitespace: '$CACHE'"
if [[ -n $AGENT_BIN ]]; then
	[[ -f $AGENT_BIN ]] || die "KESTREL_AGENT_BIN=$AGENT_BIN is not a file"
fi
if ((BUILD_AGENT)); then
	[[ -f $AGENT_DIR/Cargo.toml && -f $AGENT_DIR/Cargo.lock ]] || die "missing $AGENT_DIR/Cargo.{toml,lock}"
	command -v cargo >/dev/null && command -v rustc >/dev/null ||
		die "cargo/rustc not found: install a Rust toolchain to build the guest agent, or set KESTREL_AGENT_BIN (empty: no agent)"
fi

# ------------------------------------------------------------------ input hashes
KERNEL_VERSION=${PKG_VERSION[$KERNEL_PKG]}
BUSYBOX_VERSION=${PKG_VERSION[$BUSYBOX_PKG]}
shopt -s nullglob
PATCHES=("$PATCH_DIR"/*.patch)
shopt -u nullglob

sha() { sha256sum "$@" | cut -d' ' -f1; }

# Agent inputs: its sources, those of the protocol crate it links (agent-proto, by path) and
# the compiler (run in AGENT_DIR: rustup picks the toolchain by directory, as for the build
# itself).
agent_src_inputs() {
	cd "$AGENT_DIR" || exit 1
	echo "rustc $(rustc -V)"
	find Cargo.toml Cargo.lock src ../../agent-proto/Cargo.toml ../../agent-proto/src -type f -print0 |
		LC_ALL=C sort -z | xargs -0 sha256sum
}
if ((BUILD_AGENT)); then
	AGENT_SRC_HASH=$(agent_src_inputs | sha256sum | cut -d' ' -f1) ||
		die "cannot hash the agent sources in $AGENT_DIR"
fi

# Kernel inputs: the kernel artifacts depend on these only.
kernel_inputs() {
	echo "build-guest.sh $(sha "$SCRIPT_PATH")"
	echo "linux-source $KERNEL_VERSION"
	echo "kernel.config $(sha "$FRAGMENT")"
	local p
	for p in "${PATCHES[@]}"; do echo "patch ${p##*/} $(sha "$p")"; done
}
KHASH=$(kernel_inputs | sha256sum | cut -d' ' -f1)

all_inputs() {
	echo "kernel $KHASH"
	echo "busybox-static $BUSYBOX_VERSION"
	echo "init $(sha "$INIT_SCRIPT")"
	if ((BUILD_AGENT)); then
		echo "agent-src $AGENT_SRC_HASH"
	elif [[ -n $AGENT_BIN ]]; then
		echo "agent $(sha "$AGENT_BIN")"
	else
		echo "agent none"
	fi
}
HASH=$(all_inputs | sha256sum | cut -d' ' -f1)
HASH16=${HASH:0:16}
KHASH16=${KHASH:0:16}

GUEST_ROOT=$CACHE/guest
OUT_DIR=$GUEST_ROOT/$HASH16
if [[ $MODE == hash ]]; then
	echo "$OUT_DIR"
	exit 0
fi

publish() {
	# Atomically repoint guest/current (relative link: the cache can be moved).
	if ! { ln -sfn "$HASH16" "$GUEST_ROOT/.current.$$" 2>/dev/null &&
		mv -T "$GUEST_ROOT/.current.$$" "$GUEST_ROOT/current" 2>/dev/null; }; then
		rm -f "$GUEST_ROOT/.current.$$" 2>/dev/null || true
		log "warning: cannot update $GUEST_ROOT/current (read-only cache?)"
	fi
	echo "vmlinux=$OUT_DIR/vmlinux"
	echo "initramfs=$OUT_DIR/initramfs.cpio"
}

# Fast path: nothing to do.
if [[ -f $OUT_DIR/vmlinux && -f $OUT_DIR/initramfs.cpio ]]; then
	publish
	exit 0
fi

# ------------------------------------------------------------------ slow path
mkdir -p "$GUEST_ROOT" "$CACHE/build" || die "cannot create cache dir $CACHE (set KESTREL_CACHE?)"
exec 9>"$CACHE/build/.lock"
if ! flock -n 9; then
	log "another build-guest.sh holds $CACHE/build/.lock; waiting"
	flock 9
fi
# Someone else may have built it while we waited.
if [[ -f $OUT_DIR/vmlinux && -f $OUT_DIR/initramfs.cpio ]]; then
	publish
	exit 0
fi

START=$SECONDS
TMP_OUT=$GUEST_ROOT/.tmp-$HASH16.$$
KBUILD_ROOT=$CACHE/build/linux-$KERNEL_VERSION
KERNEL_DIR=$KBUILD_ROOT/kernel-$KHASH16
TMP_KERNEL=$KBUILD_ROOT/.tmp-kernel-$KHASH16.$$
LOG=$TMP_OUT/build.log
rm -rf "$TMP_OUT"
mkdir -p "$TMP_OUT" "$KBUILD_ROOT"

on_exit() {
	local rc=$?
	if ((rc != 0)); then
		if [[ -f $LOG ]]; then
			local keep=$GUEST_ROOT/$HASH16.failed.log
			cp -f "$LOG" "$keep" 2>/dev/null || keep=$LOG
			{
				echo "---- last 60 lines of the build log ($keep) ----"
				tail -n 60 "$LOG"
				echo "----"
			} >&2
		fi
		printf 'build-guest: FAILED (exit %d)\n' "$rc" >&2
	fi
	rm -rf "$TMP_OUT" "$TMP_KERNEL" "${TMP_PRISTINE:-}"
}
trap on_exit EXIT

{
	echo "# build-guest.sh $(date -u +%FT%TZ) hash $HASH"
	all_inputs
	kernel_inputs
} >"$LOG"

# Run a command with its output in the build log.
q() {
	echo "+ $*" >>"$LOG"
	"$@" >>"$LOG" 2>&1
}

# Compare every CONFIG_ line of the fragment with the final .config; fail listing mismatches.
# `CONFIG_X=n` and `# CONFIG_X is not set` both mean "off", which an absent symbol satisfies.
check_config() {
	local fragment=$1 final=$2
	awk '
		function parse(line, r) {
			if (match(line, /^CONFIG_[A-Za-z0-9_]+=/)) {
				r["k"] = substr(line, 1, RLENGTH - 1); r["v"] = substr(line, RLENGTH + 1)
				if (r["v"] == "n") r["v"] = "<not set>"
				return 1
			}
			if (line ~ /^# CONFIG_[A-Za-z0-9_]+ is not set$/) {
				split(line, f, " "); r["k"] = f[2]; r["v"] = "<not set>"
				return 1
			}
			return 0
		}
		FNR == NR { if (parse($0, e)) final[e["k"]] = e["v"]; next }
		{
			if (!parse($0, e)) next
			k = e["k"]; want = e["v"]; n++
			if ((k in wanted) && wanted[k] != want) {
				printf "  %s: fragment asks for both %s and %s\n", k, wanted[k], want; bad++
			}
			wanted[k] = want
			got = (k in final) ? final[k] : "<not set>"
			if (got != want) { printf "  %s: wanted %s, got %s\n", k, want, got; bad++ }
		}
		END {
			if (bad) { printf "%d of %d fragment options did not end up as requested\n", bad, n; exit 1 }
			printf "config check: all %d fragment options as requested\n", n
		}
	' "$final" "$fragment"
}

# --------------------------------------------------------------- agent
# Static x86_64 binary from resources/agent. Built before the kernel (fails fast). The
# target dir lives in the cache so the checkout stays clean; CARGO_ENCODED_RUSTFLAGS beats
# any RUSTFLAGS/config of the caller, and --target keeps crt-static off proc-macros.
build_agent() {
	# One cargo target dir per checkout: cargo judges freshness by file times against the last
	# build in its dir, not by which checkout that build came from, so a shared dir handed one
	# checkout's agent to another checkout's initramfs (cached under the other's input hash).
	local tdir
	tdir=$CACHE/agent-target/$(printf '%s' "$AGENT_DIR" | sha256sum | cut -c1-16)
	log "building the guest agent (resources/agent, static $AGENT_TARGET; log: $LOG)"
	(cd "$AGENT_DIR" && q env -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET -u CARGO_BUILD_TARGET_DIR \
		CARGO_ENCODED_RUSTFLAGS=$'-Ctarget-feature=+crt-static\x1f-Crelocation-model=static' \
		cargo build --release --locked --target "$AGENT_TARGET" --target-dir "$tdir") ||
		die "building the guest agent failed (log: $LOG)"
	AGENT_BIN=$tdir/$AGENT_TARGET/release/kestrel-agent
	[[ -f $AGENT_BIN ]] || die "cargo did not produce $AGENT_BIN"
}
if ((BUILD_AGENT)); then build_agent; fi

# --------------------------------------------------------------- kernel
MAKE_ENV=(env -u O -u KBUILD_OUTPUT -u CROSS_COMPILE -u KCONFIG_CONFIG LC_ALL=C
	KBUILD_BUILD_USER=kestrel KBUILD_BUILD_HOST=kestrel
	"KBUILD_BUILD_TIMESTAMP=Mon Jan  1 00:00:00 UTC 2024")

build_kernel() {
	local pristine=$KBUILD_ROOT/pristine src=$KBUILD_ROOT/src out=$KBUILD_ROOT/out

	# 1. Pristine tree, extracted once per linux-source version (atomically renamed into place).
	if [[ ! -f $pristine/Makefile ]]; then
		log "extracting $KERNEL_TARBALL ($KERNEL_VERSION)"
		[[ -f $KERNEL_TARBALL ]] || die "$KERNEL_TARBALL not found (is $KERNEL_PKG installed?)"
		rm -rf "$pristine"
		TMP_PRISTINE=$KBUILD_ROOT/.tmp-pristine.$$
		mkdir -p "$TMP_PRISTINE"
		q tar -C "$TMP_PRISTINE" -xf "$KERNEL_TARBALL"
		[[ -f $TMP_PRISTINE/$KERNEL_TOPDIR/Makefile ]] || die "unexpected tarball layout"
		mv -T "$TMP_PRISTINE/$KERNEL_TOPDIR" "$pristine"
		rm -rf "$TMP_PRISTINE"
	fi

	# 2. Patched source tree: a hard-link copy of pristine plus our patches. The stamp records
	#    which patch set it carries; anything else (or a half-done copy) is rebuilt from scratch.
	#    Files a patch touches are un-shared first, so the pristine tree is never modified.
	#    The kernel is built out of tree (O=out), so the source tree is never written to.
	local want_stamp
	want_stamp=$(for p in "${PATCHES[@]}"; do echo "${p##*/} $(sha "$p")"; done | sha256sum | cut -d' ' -f1)
	if [[ "$(cat "$src/.kestrel-patched" 2>/dev/null)" != "$want_stamp" ]]; then
		log "preparing patched source tree (${#PATCHES[@]} patch(es))"
		rm -rf "$src" "$out"
		q cp -al "$pristine" "$src.tmp.$$"
		local p f
		for p in "${PATCHES[@]}"; do
			while read -r f; do
				[[ -e $src.tmp.$$/$f ]] || continue
				cp -p -- "$src.tmp.$$/$f" "$src.tmp.$$/$f.kestrel-unshare"
				mv -f -- "$src.tmp.$$/$f.kestrel-unshare" "$src.tmp.$$/$f"
			done < <(sed -n 's|^+++ [^/]*/\([^[:space:]]*\).*|\1|p' "$p")
			log "applying ${p##*/}"
			q patch -p1 --forward --batch --no-backup-if-mismatch -d "$src.tmp.$$" -i "$p" ||
				die "patch ${p##*/} does not apply to $KERNEL_PKG $KERNEL_VERSION"
		done
		echo "$want_stamp" >"$src.tmp.$$/.kestrel-patched"
		mv -T "$src.tmp.$$" "$src"
	fi

	# 3. Build dir. A build killed half-way leaves the marker: start that dir from scratch.
	if [[ -e $out/.kestrel-building ]]; then
		log "previous build in $out did not finish; cleaning it"
		rm -rf "$out"
	fi
	mkdir -p "$out"
	touch "$out/.kestrel-building"

	local kmake=("${MAKE_ENV[@]}" make -C "$src" O="$out" ARCH=x86_64)
	log "configuring: tinyconfig + $(basename "$FRAGMENT")"
	q "${kmake[@]}" tinyconfig
	(cd "$out" && q "${MAKE_ENV[@]}" ARCH=x86_64 "$src/scripts/kconfig/merge_config.sh" -m .config "$FRAGMENT")
	q "${kmake[@]}" olddefconfig
	local report
	if ! report=$(check_config "$FRAGMENT" "$out/.config"); then
		printf '%s\n' "$report" >>"$LOG"
		printf 'build-guest: kernel config check FAILED:\n%s\n' "$report" >&2
		exit 1
	fi
	printf '%s\n' "$report" >>"$LOG"
	log "$report"

	local jobs p
	jobs=$(nproc)
	log "building vmlinux with -j$jobs (several minutes; log: $LOG)"
	q "${kmake[@]}" -j"$jobs" vmlinux
	# Every patch must be (still) applied in the tree we just built from.
	for p in "${PATCHES[@]}"; do
		q patch -p1 -R --dry-run --batch -d "$src" -i "$p" ||
			die "${p##*/} is not applied in $src"
	done

	# gen_init_cpio builds the initramfs without root (device nodes) and reproducibly.
	mkdir -p "$TMP_KERNEL"
	q gcc -O2 -o "$TMP_KERNEL/gen_init_cpio" "$src/usr/gen_init_cpio.c"
	q strip --strip-debug -o "$TMP_KERNEL/vmlinux" "$out/vmlinux"
	cp "$out/.config" "$TMP_KERNEL/config"
	cp "$LOG" "$TMP_KERNEL/build.log"
	rm -f "$out/.kestrel-building"
	rm -rf "$KERNEL_DIR"
	mv -T "$TMP_KERNEL" "$KERNEL_DIR"
}

if [[ -f $KERNEL_DIR/vmlinux && -f $KERNEL_DIR/config && -x $KERNEL_DIR/gen_init_cpio ]]; then
	log "kernel inputs unchanged: reusing $KERNEL_DIR"
	echo "# kernel reused from $KERNEL_DIR (its build log: $KERNEL_DIR/build.log)" >>"$LOG"
	# The fragment may only have been reformatted; re-check anyway (cheap).
	check_config "$FRAGMENT" "$KERNEL_DIR/config" >>"$LOG" || die "cached kernel config fails the check"
else
	build_kernel
fi

# Hard link when possible (same file system), copy otherwise.
ln -f "$KERNEL_DIR/vmlinux" "$TMP_OUT/vmlinux" 2>/dev/null || cp "$KERNEL_DIR/vmlinux" "$TMP_OUT/vmlinux"
cp "$KERNEL_DIR/config" "$TMP_OUT/config"

# --------------------------------------------------------------- initramfs
is_static_elf() {
	# ELF without a PT_INTERP program header.
	[[ "$(head -c 4 "$1" | od -An -c | tr -d ' \n')" == '177ELF' ]] || return 1
	! LC_ALL=C readelf -lW "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}

build_initramfs() {
	local stage=$TMP_OUT/stage list=$TMP_OUT/initramfs.list
	log "building initramfs (busybox-static $BUSYBOX_VERSION${AGENT_BIN:+, agent $AGENT_BIN})"
	is_static_elf "$BUSYBOX_BIN" || die "$BUSYBOX_BIN is not a static ELF binary"
	mkdir -p "$stage"
	cp "$BUSYBOX_BIN" "$stage/busybox"
	cp "$INIT_SCRIPT" "$stage/init"
	printf '%s\n' \
		'# Mounted by /init with one `mount -a`.' \
		'proc     /proc proc     nosuid,nodev,noexec 0 0' \
		'sysfs    /sys  sysfs    nosuid,nodev,noexec 0 0' \
		'devtmpfs /dev  devtmpfs nosuid,mode=0755    0 0' >"$stage/fstab"
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/passwd"
	printf 'root:x:0:\n' >"$stage/group"

	{
		echo "# gen_init_cpio list generated by build-guest.sh"
		local d
		for d in /bin /sbin /usr /usr/bin /usr/sbin /dev /proc /sys /tmp /mnt /etc /root; do
			case $d in
			/tmp) echo "dir $d 1777 0 0" ;;
			/root) echo "dir $d 0700 0 0" ;;
			*) echo "dir $d 0755 0 0" ;;
			esac
		done
		echo "nod /dev/console 0600 0 0 c 5 1"
		echo "nod /dev/null 0666 0 0 c 1 3"
		echo "file /init $stage/init 0755 0 0"
		echo "file /bin/busybox $stage/busybox 0755 0 0"
		echo "file /etc/fstab $stage/fstab 0644 0 0"
		echo "file /etc/passwd $stage/passwd 0644 0 0"
		echo "file /etc/group $stage/group 0644 0 0"
		if [[ -n $AGENT_BIN ]]; then
			is_static_elf "$AGENT_BIN" || die "KESTREL_AGENT_BIN=$AGENT_BIN is not a static ELF binary"
			cp "$AGENT_BIN" "$stage/kestrel-agent"
			echo "file /sbin/kestrel-agent $stage/kestrel-agent 0755 0 0"
		fi
		# Applet links, relative to /bin/busybox, as the host's busybox lists them.
		local applet dir target
		declare -A seen_dir=([.]=1 [bin]=1 [sbin]=1 [usr]=1 [usr/bin]=1 [usr/sbin]=1)
		while read -r applet; do
			[[ -n $applet && $applet != bin/busybox && $applet != sbin/kestrel-agent ]] || continue
			[[ $applet != */../* && $applet != /* ]] || die "odd applet path: $applet"
			dir=$(dirname -- "$applet")
			[[ -n ${seen_dir[$dir]:-} ]] || die "applet in unexpected dir: $applet"
			case $dir in
			.) target=bin/busybox ;;
			bin) target=busybox ;;
			sbin | usr) target=../bin/busybox ;;
			*) target=../../bin/busybox ;; # usr/bin, usr/sbin
			esac
			echo "slink /$applet $target 0777 0 0"
		done < <("$BUSYBOX_BIN" --list-full | LC_ALL=C sort)
	} >"$list"

	echo "+ gen_init_cpio -t $CPIO_MTIME $list > initramfs.cpio" >>"$LOG"
	"$KERNEL_DIR/gen_init_cpio" -t "$CPIO_MTIME" "$list" >"$TMP_OUT/initramfs.cpio" 2>>"$LOG" ||
		die "gen_init_cpio failed"
	rm -rf "$stage" "$list"
}

# Sanity checks before anything is published.
verify_artifacts() {
	local listing entry
	[[ "$(head -c 4 "$TMP_OUT/vmlinux" | od -An -c | tr -d ' \n')" == '177ELF' ]] ||
		die "vmlinux is not an ELF file"
	[[ "$(head -c 6 "$TMP_OUT/initramfs.cpio")" == 070701 ]] ||
		die "initramfs.cpio is not an uncompressed newc cpio archive"
	listing=$(cpio -it --quiet <"$TMP_OUT/initramfs.cpio") || die "cpio cannot read initramfs.cpio"
	for entry in init bin/busybox bin/sh sbin/reboot dev/console dev/null etc/fstab \
		${AGENT_BIN:+sbin/kestrel-agent}; do
		grep -qxF "$entry" <<<"$listing" || die "initramfs.cpio lacks $entry"
	done
}

build_initramfs
verify_artifacts

# --------------------------------------------------------------- publish
{
	echo "# artifacts"
	ls -l "$TMP_OUT"
	echo "# done in $((SECONDS - START)) s"
} >>"$LOG"
rm -rf "$OUT_DIR"
mv -T "$TMP_OUT" "$OUT_DIR"
LOG=$OUT_DIR/build.log
rm -f "$GUEST_ROOT/$HASH16.failed.log"
log "done in $((SECONDS - START)) s: $OUT_DIR"
publish
