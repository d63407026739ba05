#!/usr/bin/env python3
"""Independent check of nvmux's encryption (Python `cryptography`, i.e. OpenSSL).

Usage: xts_decrypt.py STATE_JSON DISK KEK_FILE IMAGE OFFSET LENGTH OUT
Unwraps the disk's data key from state.json with the KEK (RFC 3394), decrypts LENGTH
bytes of IMAGE at OFFSET as aes-xts-plain64 (512-byte sectors, tweak = sector number,
16 bytes little-endian) and writes the plaintext to OUT.
"""
import json
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

state, disk, kek_file, image, offset, length, out = sys.argv[1:8]
offset, length = int(offset), int(length)
kek = open(kek_file, "rb").read()
if len(kek) != 32:
    kek = bytes.fromhex(kek.decode().strip())
spec = next(d for d in json.load(open(state))["disks"] if d["name"] == disk)
assert spec["crypt"]["cipher"] == "aes-xts-plain64", spec["crypt"]
dek = aes_key_unwrap(kek, bytes.fromhex(spec["crypt"]["wrapped_key"]))
assert len(dek) == 64
assert offset % 512 == 0 and length % 512 == 0
with open(image, "rb") as f:
    f.seek(offset)
    ct = f.read(length)
plain = bytearray()
for i in range(0, length, 512):
    sector = (offset + i) // 512
    d = Cipher(algorithms.AES(dek), modes.XTS(sector.to_bytes(16, "little"))).decryptor()
    plain += d.update(ct[i:i + 512]) + d.finalize()
open(out, "wb").write(plain)
