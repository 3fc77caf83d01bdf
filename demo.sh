#!/bin/sh
# dtools demo: two sites on this machine exchange a study through a Maildir relay.
# Site A indexes sample studies, finds the CT studies of January 2026, seals them for
# site B and sends them; site B receives, opens, indexes them and sends a signed
# receipt back. Then site A shares its catalog with site B, which searches it and
# retrieves A's MR studies. Everything lives under ./demo, or $DTOOLS_DEMO_DIR (delete it to start over).
set -eu
cd "$(dirname "$0")"
if [ -x .venv/bin/dindex ]; then PATH="$PWD/.venv/bin:$PATH"; fi
DEMO="${DTOOLS_DEMO_DIR:-$PWD/demo}"
A="$DEMO/site-a"
B="$DEMO/site-b"
mkdir -p "$A" "$B"

step() { printf '\n== %s ==\n' "$*"; }

step "site identities (dseal keygen) and peers (dseal peers add)"
for site in a b; do
    home="$DEMO/site-$site"
    [ -e "$home/keys/identity.pub" ] || dseal --home "$home" -q keygen "site-$site" > /dev/null
    # the relay is the one setting the commands do not write
    [ -e "$home/config.toml" ] && grep -q '^\[relay\]' "$home/config.toml" ||
        printf '\n[relay]\nurl = "maildir:%s"\n' "$DEMO/relay" >> "$home/config.toml"
done
dseal --home "$A" peers add site-b "$(cat "$B/keys/identity.pub")"
dseal --home "$B" peers add site-a "$(cat "$A/keys/identity.pub")"
dseal --home "$A" peers

step "site A: index sample studies (CT and MR, names in several character sets)"
if [ ! -d "$DEMO/data" ]; then  # written aside, then renamed: a demo killed midway writes it again
    rm -rf "$DEMO/data.part"
    python -m dtools.sample "$DEMO/data.part" --studies 8 && mv "$DEMO/data.part" "$DEMO/data"
fi
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

step "site A grants site B its catalog and retrieval, once (dseal peers grant)"
dseal --home "$A" peers grant site-b share retrieve

step "site A: dserve --relay --once (from cron) publishes its catalog to site B"
dserve --home "$A" --relay --once
receive "$B" > /dev/null

step "site B: search site A's archive from the copy of its catalog (dsearch --peer)"
dsearch --home "$B" --peer site-a --level study --table --fields PatientName,StudyDate,ModalitiesInStudy

step "site B: retrieve site A's MR studies (dretrieve --wait); site A's cron job answers meanwhile"
( sleep 1; dserve --home "$A" --relay --once ) &
dsearch --home "$B" --peer site-a --level study Modality=MR | dretrieve --home "$B" --wait 2m > /dev/null
wait
dsearch --home "$B" --level study --table --fields PatientName,StudyDate,ModalitiesInStudy
receive "$A" > /dev/null  # the receipts for what site B opened

step "where everything stands, at each site (dstatus)"
dstatus --home "$A" --table
dstatus --home "$B" --table
