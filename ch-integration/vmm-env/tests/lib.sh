# Helpers sourced by the guest test scripts (". /tests/lib.sh"); not a test itself.
# Test parameters arrive as VT_* environment variables (vt.foo=1 -> VT_FOO=1).

# result KEY VALUE... : print one "VMTEST-RESULT KEY=VALUE" line (value may contain spaces)
result() {
    _k=$1
    shift
    echo "VMTEST-RESULT $_k=$*"
}

# fail MESSAGE : print an error marker and remember that the test failed
VMTEST_FAILED=0
fail() {
    echo "VMTEST-ERROR $*"
    VMTEST_FAILED=1
}

# num VALUE : print VALUE (decimal, or 0x-prefixed hex) as a decimal number, or fail
num() {
    case "$1" in
        0x*|0X*) printf '%d' "$1" 2>/dev/null && return 0 ;;
        ''|*[!0-9]*) ;;
        *) printf '%d' "$1" && return 0 ;;
    esac
    echo "VMTEST-ERROR not a number: '$1'" >&2
    return 1
}

# wait_for PATH SECONDS : wait until PATH exists
wait_for() {
    _n=$(($2 * 10))
    while [ ! -e "$1" ]; do
        [ "$_n" -le 0 ] && return 1
        _n=$((_n - 1))
        usleep 100000
    done
}

# sha256 [FILE] : print just the hex digest of FILE or stdin
sha256() {
    sha256sum "$@" | cut -d' ' -f1
}
