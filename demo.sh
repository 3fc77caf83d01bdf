#!/bin/sh
# dtools demo: two sites on this machine exchange a study through a Maildir relay.
# Site A indexes sample studies, finds the CT studies of January 2026, seals them for
# site B and sends them; site B receives, opens, indexes them and sends a signed
# receipt back. Everything lives under ./demo, or $DTOOLS_DEMO_DIR (delete it to start over).
set -eu
cd "$(dirname "$0")"
if [ -x .venv/bin/dindex ]; then PATH="$PWD/.venv/bin:$PATH"; fi
DEMO="${DTOOLS_DEMO_DIR:-$PWD/demo}"
A="$DEMO/site-a"
B="$DEMO/site-b"
mkdir -p "$A" "$B"

step() { printf '\n== %s ==\n' "$*"; }

step "site identities (dseal keygen)"
[ -n "$(ls -A "$A/keys" 2>/dev/null)" ] || dseal --home "$A" keygen site-a > "$DEMO/site-a.pub"
[ -n "$(ls -A "$B/keys" 2>/dev/null)" ] || dseal --home "$B" keygen site-b > "$DEMO/site-b.pub"
for site in a b; do
    other=$([ $site = a ] && echo b || echo a)
    cat > "$DEMO/site-$site/config.toml" <<TOML
[site]
name = "site-$site"

[relay]
url = "maildir:$DEMO/relay"

[peers.site-$other]
identity = "$(cat "$DEMO/site-$other.pub")"
TOML
done
dseal --home "$A" peers

step "site A: index sample studies (CT and MR, names in several character sets)"
[ -d "$DEMO/data" ] || python -m dtools.sample "$DEMO/data" --studies 8
dindex --home "$A" -q "$DEMO/data"
dsearch --home "$A" --level study --table --fields PatientName,StudyDate,ModalitiesInStudy,StudyDescription

send() {
    dsearch --home "$A" Modality=CT StudyDate=20260101-20260131 \
        | dseal --home "$A" --to site-b \
        | dmail-send --home "$A"
}
receive() {
    dmail-recv --home "$1" \
        | dseal --home "$1" --open \
        | dindex --home "$1" \
        | dmail-send --home "$1" --receipts
}

step "site A: seal the CT studies of January 2026 for site B and send them"
send

step "site A: the same line again (as cron runs it every minute): nothing goes twice"
send

step "site B: receive, open, index, and send a receipt"
receive "$B" > /dev/null
dsearch --home "$B" --level study --table --fields PatientName,StudyDate,ModalitiesInStudy,StudyDescription

step "site A: the receipt comes back (the same receive line takes receipts)"
receive "$A"

step "where everything stands, at each site (dstatus)"
dstatus --home "$A" --table
dstatus --home "$B" --table
