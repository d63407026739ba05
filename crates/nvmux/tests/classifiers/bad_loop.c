/* Refused: a loop whose trip count the guest controls (nlb). */
#include "nvmux_classifier.h"

SEC("classifier")
int bad_loop(struct nvmux_ctx *ctx)
{
	__u64 acc = 0;

	for (__u32 i = 0; i < ctx->nlb; i++)
		acc += nvmux_prandom_u32();
	ctx->cookie = acc;
	return NVMUX_CHAIN;
}
