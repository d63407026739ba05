/* Refused: tries to leak an address. It stores the context pointer in a stack slot and
 * hands that slot to nvmux_map_update() as the value, so that anyone who reads the map
 * (another run of the program, or the operator's API) would learn where the daemon keeps
 * its context. The verifier refuses pointer bytes anywhere in a map_update value.
 *
 * Used by the router tests and by the attacker suite (issue 15). */
#include "nvmux_classifier.h"

NVMUX_MAP(leak) = { NVMUX_MAP_ARRAY, 4, 8, 1, 0 };

SEC("classifier")
int bad_leak_pointer(struct nvmux_ctx *ctx)
{
	__u32 key = 0;
	/* volatile: make clang spill the pointer to the stack and pass the slot itself */
	struct nvmux_ctx *volatile slot = ctx;

	nvmux_map_update(&leak, &key, (const void *)&slot, 0);
	return NVMUX_CHAIN;
}
