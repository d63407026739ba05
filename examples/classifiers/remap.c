/* Partition remap: the guest's LBA 0 is the disk's LBA `offset`, and the guest may use
 * `length` blocks from there. Map `part`, entry 0: two __u64, offset and length:
 *     nvmux disk map-set DISK part 0 OFFSET LENGTH
 * A command past the partition fails with LBA Out of Range before it reaches the disk;
 * the router checks the rewritten range against the disk again, so a wrong offset can
 * never reach outside the disk. With no partition set (length 0) every command fails with
 * Namespace Not Ready. Flush has no range and passes.
 *
 * The guest still sees the whole disk's size (the capacity is not the classifier's to
 * change): size the disk to the partition, or tell the guest through its partition table.
 */
#include "nvmux_classifier.h"

NVMUX_MAP(part) = { NVMUX_MAP_ARRAY, 4, 16, 1, 0 };

SEC("classifier")
int remap(struct nvmux_ctx *ctx)
{
	__u32 key = 0;
	__u64 *p;

	if (ctx->opcode == NVMUX_OP_FLUSH)
		return NVMUX_CHAIN;
	p = nvmux_map_lookup(&part, &key);
	if (!p || p[1] == 0) {
		ctx->status = NVMUX_NAMESPACE_NOT_READY;
		return NVMUX_COMPLETE;
	}
	if (ctx->slba + ctx->nlb > p[1] || ctx->slba + ctx->nlb < ctx->slba) {
		ctx->status = NVMUX_LBA_OUT_OF_RANGE;
		return NVMUX_COMPLETE;
	}
	ctx->slba += p[0];
	return NVMUX_CHAIN;
}
