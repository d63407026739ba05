#!/usr/bin/env python3
"""Independent check of nvmux's encryption (Python `cryptography`, i.e. OpenSSL).

Usage: xts_decrypt.py DATA_DIR DISK KEK_FILE IMAGE OFFSET LENGTH OUT [--key-out FILE]
Finds the disk's keystore slot in DATA_DIR/state.json, reads the wrapped data key from
DATA_DIR/keystore (format.md, "The keystore"), unwraps it with the KEK (RFC 3394),
decrypts LENGTH bytes of IMAGE at OFFSET as aes-xts-plain64 in the disk's layout
(sector_size 512 or 4096; IV = byte offset / 512, or / sector_size with
iv_large_sectors; 16 bytes little-endian) and writes the plaintext to OUT.
--key-out writes the unwrapped data key as hex (for dm-crypt in the VM test).
"""
import json
import sys

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap

args = sys.argv[1:]
key_out = None
if "--key-out" in args:
    i = args.index("--key-out")
    key_out = args[i + 1]
    del args[i:i + 2]
data_dir, disk, kek_file, image, offset, length, out = args[:7]
offset, length = int(offset), int(length)
kek = open(kek_file, "rb").read()
if len(kek) != 32:
    kek = bytes.fromhex(kek.decode().strip())
spec = next(d for d in json.load(open(f"{data_dir}/state.json"))["disks"] if d["name"] == disk)
crypt = spec["crypt"]
assert crypt["cipher"] == "aes-xts-plain64", crypt
assert "wrapped_key" not in crypt, "state.json holds a wrapped key"
slot, key_id = crypt["slot"], bytes.fromhex(crypt["key_id"])
sector = crypt.get("sector_size", 512)
large = crypt.get("iv_large_sectors", False)
with open(f"{data_dir}/keystore", "rb") as f:
    assert f.read(8) == b"NVMUXKS\0", "keystore magic"
    f.seek(256 * (1 + slot))
    s = f.read(256)
assert s[:4] == b"NVKY" and s[8:24] == key_id, "keystore slot"
dek = aes_key_unwrap(kek, s[32:104])
assert len(dek) == 64
if key_out:
    open(key_out, "w").write(dek.hex())
assert offset % sector == 0 and length % sector == 0
with open(image, "rb") as f:
    f.seek(offset)
    ct = f.read(length)
plain = bytearray()
for i in range(0, length, sector):
    at = offset + i
    iv = at // sector if large else at // 512
    d = Cipher(algorithms.AES(dek), modes.XTS(iv.to_bytes(16, "little"))).decryptor()
    plain += d.update(ct[i:i + sector]) + d.finalize()
open(out, "wb").write(plain)
