/* Refused: reads 8 bytes past the end of the 64-byte context. */
#include "nvmux_classifier.h"

SEC("classifier")
int bad_ctx(struct nvmux_ctx *ctx)
{
	return *(__u64 *)((char *)ctx + sizeof(*ctx)) ? NVMUX_FAST : NVMUX_CHAIN;
}
