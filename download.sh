#!/usr/bin/env bash
# Downloads Llama 2 weights with the presigned URL from Meta's email.
#
#   bash download.sh                       # asks for the URL and the models
#   PRESIGNED_URL='https://...' MODEL_SIZE=7B-chat TARGET_FOLDER=/data/llama bash download.sh
#
# Every file is fetched into NAME.part (resumed with `wget --continue` after an
# interruption), checked against Meta's md5 checklist, and only then renamed to NAME,
# so a file under its final name is always complete and verified.

set -euo pipefail

ALL_MODELS="7B,13B,70B,7B-chat,13B-chat,70B-chat"
RETRIES="${DOWNLOAD_RETRIES:-5}"

usage() {
    cat <<EOF
Usage: bash download.sh [--help]

Downloads Llama 2 weights from the presigned URL in Meta's email.
Asks for the URL and a comma-separated list of models, or reads them from the environment:

  PRESIGNED_URL   the URL from the email (its '*' is replaced by each file's path)
  MODEL_SIZE      models to fetch, from: ${ALL_MODELS}   (empty: all)
  TARGET_FOLDER   where to put them (default: the current folder)
  DOWNLOAD_RETRIES  attempts per file on network failure (default: 5)

Each model lands in its own folder (llama-2-7b, llama-2-7b-chat, ...) with its shards
(7B: 1, 13B: 2, 70B: 8), params.json and checklist.chk; tokenizer.model, LICENSE and
USE_POLICY.md go in TARGET_FOLDER. Run it again to resume: verified files are kept,
partial ones continue where they stopped.
EOF
}

die() {
    echo "ERROR: $*" >&2
    exit 1
}

case "${1:-}" in
    -h | --help) usage; exit 0 ;;
    "") ;;
    *) usage >&2; die "unknown argument '$1'" ;;
esac

# -- tools ------------------------------------------------------------------------------------

command -v wget >/dev/null || die "wget is not installed: install it (Debian/Ubuntu: apt-get install wget; macOS: brew install wget)"

md5_of() {  # prints the md5 of file $1
    if command -v md5sum >/dev/null; then
        md5sum "$1" | cut -d' ' -f1
    elif command -v md5 >/dev/null; then
        md5 -q "$1"
    elif command -v openssl >/dev/null; then
        openssl md5 -r "$1" | cut -d' ' -f1
    else
        die "no md5 tool found: install coreutils (md5sum) or openssl"
    fi
}
md5_of /dev/null >/dev/null

# -- what to fetch ----------------------------------------------------------------------------

if [[ -z "${PRESIGNED_URL:-}" ]]; then
    read -r -p "Enter the URL from email: " PRESIGNED_URL
    echo ""
fi
if [[ -z "${MODEL_SIZE+set}" ]]; then
    read -r -p "Enter the list of models to download without spaces (${ALL_MODELS}), or press Enter for all: " MODEL_SIZE
fi
TARGET_FOLDER="${TARGET_FOLDER:-.}"

[[ -n "$PRESIGNED_URL" ]] || die "no URL given: paste the presigned URL from Meta's email"
[[ "$PRESIGNED_URL" == *"*"* ]] || die "the URL has no '*': paste the whole presigned URL from Meta's email, unchanged"
[[ -n "$MODEL_SIZE" ]] || MODEL_SIZE="$ALL_MODELS"

model_folder() {  # model name -> "folder last_shard_index"
    case "$1" in
        7B) echo "llama-2-7b 0" ;;
        7B-chat) echo "llama-2-7b-chat 0" ;;
        13B) echo "llama-2-13b 1" ;;
        13B-chat) echo "llama-2-13b-chat 1" ;;
        70B) echo "llama-2-70b 7" ;;
        70B-chat) echo "llama-2-70b-chat 7" ;;
        *) return 1 ;;
    esac
}

MODELS=()
for m in ${MODEL_SIZE//,/ }; do
    model_folder "$m" >/dev/null || die "unknown model '$m': choose from ${ALL_MODELS} (comma-separated, no spaces)"
    MODELS+=("$m")
done

mkdir -p "$TARGET_FOLDER"
VERIFIED=()

# -- download and verify ----------------------------------------------------------------------

url_for() { echo "${PRESIGNED_URL/'*'/$1}"; }

http_status() {  # http_status LOG: the code of the last "HTTP request sent, awaiting response... NNN" line wget logged
    sed -n -e 's/^HTTP request sent, awaiting response\.\.\. \([0-9][0-9][0-9]\)$/\1/p' \
        -e 's/^HTTP request sent, awaiting response\.\.\. \([0-9][0-9][0-9]\) .*/\1/p' "$1" | tail -n 1
}

fetch() {  # fetch REMOTE_PATH DEST: download into DEST.part (resuming), then leave it for the caller
    local remote="$1" dest="$2" log status progress code
    log="$(mktemp)"
    progress="dot:giga"
    [[ -t 2 ]] && progress="bar:force:noscroll"
    echo "Downloading ${remote}"
    set +e
    # LC_ALL=C: wget's messages in English, so that its HTTP status line can be read below.
    LC_ALL=C wget --continue --tries="$RETRIES" --waitretry=2 --retry-connrefused --timeout=60 \
        --progress="$progress" -O "${dest}.part" "$(url_for "$remote")" 2>&1 >/dev/null | tee "$log" >&2
    status=${PIPESTATUS[0]}
    set -e
    [[ $status -eq 0 ]] && { rm -f "$log"; return; }
    code="$(http_status "$log")"
    rm -f "$log"
    [[ -s "${dest}.part" ]] || rm -f "${dest}.part"
    case "$status" in
        8)  # the server answered with an error status
            case "$code" in
                403) die "the server refused ${remote} (HTTP 403 Forbidden): presigned URLs expire after 24 hours and allow a limited number of downloads. Request a new URL from Meta's website, then run download.sh again (finished files are kept)." ;;
                404) die "the server has no ${remote} (HTTP 404 Not Found): check that the URL was pasted whole and unchanged, or request a new one, then run download.sh again (finished files are kept)." ;;
                *) die "the server answered ${remote} with an error (HTTP ${code:-status unknown}, wget exit code 8). Run download.sh again later (finished files are kept); if it persists, request a new URL from Meta's website." ;;
            esac ;;
        4) die "could not download ${remote} after ${RETRIES} attempts (network failure, wget exit code 4). Check your connection and run download.sh again: it resumes where it stopped." ;;
        3) die "could not write ${dest}.part (wget exit code 3): check the free space and permissions of ${TARGET_FOLDER}, then run download.sh again." ;;
        5) die "SSL verification failed for ${remote} (wget exit code 5): check the system's CA certificates or an HTTPS proxy, then run download.sh again." ;;
        *) die "wget failed on ${remote} (exit code ${status}; see its messages above). Run download.sh again: it resumes where it stopped." ;;
    esac
}

checklist_md5() {  # checklist_md5 CHECKLIST NAME: the expected md5 of NAME, or nothing
    awk -v name="$2" '{ f = $2; sub(/^\*/, "", f); if (f == name) { print $1; exit } }' "$1"
}

check_checklist() {  # a checklist must be lines of "md5  filename" (not an HTML error page)
    if ! grep -Eq '^[0-9a-f]{32} [ *]?[^ ]+$' "$1" || grep -Evq '^([0-9a-f]{32} [ *]?[^ ]+)?$' "$1"; then
        rm -f "$1"
        die "$1 is not an md5 checklist (an HTML or error page?): the URL may have expired. Request a new URL and run download.sh again."
    fi
}

is_html() (  # is_html FILE: true if FILE looks like an HTML page (an error or login page, not the file)
    export LC_ALL=C  # bytes, not characters (this subshell only)
    start="$(head -c 4096 "$1" | tr -d '\000' | tr '[:upper:]' '[:lower:]')"
    start="${start#$'\xef\xbb\xbf'}"               # a UTF-8 byte-order mark
    start="${start#"${start%%[![:space:]]*}"}"     # leading blanks
    [[ "$start" == "<!doctype"* || "$start" == *"<html"* ]]
)

get_plain() {  # get_plain REMOTE DEST: a file without a checksum (license, checklists); never an HTML page
    local remote="$1" dest="$2"
    if [[ -s "$dest" ]]; then
        if ! is_html "$dest"; then
            echo "Already have ${remote}"
            return
        fi
        echo "${dest} is an HTML page, not ${remote}: downloading it again"
        rm -f "$dest"
    fi
    [[ -f "${dest}.part" ]] && is_html "${dest}.part" && rm -f "${dest}.part"  # never resume an HTML page
    fetch "$remote" "$dest"
    if is_html "${dest}.part"; then
        rm -f "${dest}.part"
        die "the server sent an HTML page instead of ${remote}: the URL has probably expired. Request a new URL from Meta's website and run download.sh again (finished files are kept)."
    fi
    mv -f "${dest}.part" "$dest"
}

get_verified() {  # get_verified REMOTE DEST CHECKLIST: download unless already verified, check md5, rename
    local remote="$1" dest="$2" checklist="$3" want got
    want="$(checklist_md5 "$checklist" "$(basename "$dest")")"
    [[ -n "$want" ]] || die "$(basename "$dest") is not listed in ${checklist}; the checklist does not belong to this download. Delete it and run download.sh again."
    if [[ -f "$dest" ]]; then
        if [[ "$(md5_of "$dest")" == "$want" ]]; then
            echo "Already have ${remote} (md5 verified)"
            VERIFIED+=("$dest")
            return
        fi
        echo "${dest} is incomplete or damaged: resuming it"
        mv -f "$dest" "${dest}.part"
    fi
    fetch "$remote" "$dest"
    got="$(md5_of "${dest}.part")"
    if [[ "$got" != "$want" ]]; then
        rm -f "${dest}.part"
        die "checksum mismatch for ${dest}: md5 ${got}, expected ${want} from ${checklist}. The damaged download was deleted; run download.sh again to fetch it anew."
    fi
    mv -f "${dest}.part" "$dest"
    echo "${dest}: md5 OK"
    VERIFIED+=("$dest")
}

echo "Downloading LICENSE and Acceptable Usage Policy"
get_plain "LICENSE" "${TARGET_FOLDER}/LICENSE"
get_plain "USE_POLICY.md" "${TARGET_FOLDER}/USE_POLICY.md"

echo "Downloading tokenizer"
rm -f "${TARGET_FOLDER}/tokenizer_checklist.chk"
get_plain "tokenizer_checklist.chk" "${TARGET_FOLDER}/tokenizer_checklist.chk"
check_checklist "${TARGET_FOLDER}/tokenizer_checklist.chk"
get_verified "tokenizer.model" "${TARGET_FOLDER}/tokenizer.model" "${TARGET_FOLDER}/tokenizer_checklist.chk"

for m in "${MODELS[@]}"; do
    read -r MODEL_PATH LAST_SHARD <<<"$(model_folder "$m")"
    echo "Downloading ${MODEL_PATH}"
    mkdir -p "${TARGET_FOLDER}/${MODEL_PATH}"
    checklist="${TARGET_FOLDER}/${MODEL_PATH}/checklist.chk"
    rm -f "$checklist"
    get_plain "${MODEL_PATH}/checklist.chk" "$checklist"
    check_checklist "$checklist"
    for s in $(seq -f "%02g" 0 "$LAST_SHARD"); do
        get_verified "${MODEL_PATH}/consolidated.${s}.pth" "${TARGET_FOLDER}/${MODEL_PATH}/consolidated.${s}.pth" "$checklist"
    done
    get_verified "${MODEL_PATH}/params.json" "${TARGET_FOLDER}/${MODEL_PATH}/params.json" "$checklist"
done

echo ""
echo "Done: ${#VERIFIED[@]} files verified against their md5 checklists:"
printf '  %s\n' "${VERIFIED[@]}"
