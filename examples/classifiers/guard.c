/* Read-only guard for an LBA range.
 *
 * Writes, write zeroes and deallocates that touch blocks [range.start, range.end) complete
 * at once with "Attempted Write to Read Only Range" (SCT 1, SC 0x82); everything else
 * takes the chain. Reads of the range are allowed. The range lives in map `range`
 * (entry 0: two __u64, start and end), so the operator moves it live:
 *     nvmux disk map-set DISK range 0 START END
 * An empty range (end <= start) guards nothing. Entry 0 of `refused` counts refusals.
 */
#include "nvmux_classifier.h"

NVMUX_MAP(range) = { NVMUX_MAP_ARRAY, 4, 16, 1, 0 };
NVMUX_MAP(refused) = { NVMUX_MAP_ARRAY, 4, 8, 1, 0 };

SEC("classifier")
int guard(struct nvmux_ctx *ctx)
{
	__u32 key = 0;
	__u64 *r, *n;

	if (ctx->opcode != NVMUX_OP_WRITE && ctx->opcode != NVMUX_OP_WRITE_ZEROES &&
	    ctx->opcode != NVMUX_OP_DEALLOCATE)
		return NVMUX_CHAIN;
	r = nvmux_map_lookup(&range, &key);
	if (!r)
		return NVMUX_CHAIN;
	/* [slba, slba + nlb) overlaps [start, end) */
	if (ctx->slba < r[1] && ctx->slba + ctx->nlb > r[0]) {
		n = nvmux_map_lookup(&refused, &key);
		if (n)
			nvmux_atomic_add(n, 1);
		ctx->status = NVMUX_WRITE_PROTECTED;
		return NVMUX_COMPLETE;
	}
	return NVMUX_CHAIN;
}
