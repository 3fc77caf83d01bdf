#!/bin/sh
# dtools demo: index a few sample studies and search them.
# Everything lives under ./demo (delete it to start over); nothing else is touched.
set -eu
cd "$(dirname "$0")"
if [ -x .venv/bin/dindex ]; then PATH="$PWD/.venv/bin:$PATH"; fi
export DTOOLS_HOME="$PWD/demo/site-a"
mkdir -p demo

echo "== sample studies (CT and MR, names in several character sets) =="
[ -d demo/data ] || python -m dtools.sample demo/data --studies 8

echo "== dindex: index them =="
dindex -q demo/data

echo "== dsearch: the studies =="
dsearch --level study --table --fields PatientName,PatientID,StudyDate,ModalitiesInStudy,StudyDescription
echo "== dsearch: CT studies in January 2026, as records =="
dsearch --level study Modality=CT StudyDate=20260101-20260131 --fields PatientName,StudyDate,StudyInstanceUID
echo "== dsearch: free text =="
dsearch --level patient 山田 --fields PatientName,PatientID
