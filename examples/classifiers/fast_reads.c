/* Reads take the fast path; writes, flushes and the rest take the chain.
 *
 * The fast path is the disk's data path without its optional functions, which today is
 * qos: reads skip rate limits and fair sharing, writes stay limited.
 *
 * Where this is safe: data. Both paths end at the same volume, so a read sees every write
 * that completed before it, as without the program.
 * Where it is not: the limits. A tenant's reads are no longer limited or fair-shared, so
 * on a shared drive its reads can crowd out its neighbours'. Use it for a disk whose
 * read limit does not matter (a tenant with the drive to itself, or a read-mostly image
 * the operator trusts).
 * And crypt: reading an encrypted disk's blocks without decryption would return
 * ciphertext, and writing them without encryption would store plaintext. So nvmux never
 * lets the fast path skip crypt: on an encrypted disk it is crypt -> volume, and this
 * program is safe there too (it then only skips qos).
 */
#include "nvmux_classifier.h"

SEC("classifier")
int fast_reads(struct nvmux_ctx *ctx)
{
	return ctx->opcode == NVMUX_OP_READ ? NVMUX_FAST : NVMUX_CHAIN;
}
