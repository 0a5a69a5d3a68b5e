/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shifter: the netfilter hooks that see TCP SYNs before NAT.
 */

#ifndef _SHIFTER_HOOKS_H
#define _SHIFTER_HOOKS_H

struct net;

int shifter_hooks_register(struct net *net);
void shifter_hooks_unregister(struct net *net);

#endif /* _SHIFTER_HOOKS_H */
