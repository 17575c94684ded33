#!/usr/bin/env bash
# Re-creates the SentencePiece test assets committed next to this script:
#   botchan.txt                public-domain English novel (Natsume Soseki, "Botchan")
#   botchan_en_bpe_1000.model  a real SentencePiece BPE model trained on it by the sentencepiece authors
# Both come from the sentencepiece source distribution (Apache-2.0), directory test/.
# Tests never run this; it documents where the files came from and lets anyone re-derive them.
# Usage: tests/assets/fetch_sp_assets.sh [python]   (needs PyPI access through pip)
set -euo pipefail
PY="${1:-python3}"
VER="0.2.3"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "sentencepiece==${VER}" -d "$TMP"
tar -xzf "$TMP/sentencepiece-${VER}.tar.gz" -C "$TMP" \
  "sentencepiece-${VER}/test/botchan.txt" "sentencepiece-${VER}/test/botchan_en_bpe_1000.model"
cp "$TMP/sentencepiece-${VER}/test/botchan.txt" "$TMP/sentencepiece-${VER}/test/botchan_en_bpe_1000.model" "$HERE/"
cd "$HERE" && sha256sum -c SHA256SUMS
