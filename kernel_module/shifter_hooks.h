/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shifter: recording in the namespaces that enabled it.
 */

#ifndef _SHIFTER_HOOKS_H
#define _SHIFTER_HOOKS_H

struct shifter_net;

int shifter_hooks_enable(struct shifter_net *sn);
void shifter_hooks_disable(struct shifter_net *sn);
void shifter_hooks_net_pre_exit(struct shifter_net *sn);
void shifter_hooks_net_exit(struct shifter_net *sn);

#endif /* _SHIFTER_HOOKS_H */
