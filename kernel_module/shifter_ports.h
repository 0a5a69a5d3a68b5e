/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shifter: the destination ports watched in each namespace.
 */

#ifndef _SHIFTER_PORTS_H
#define _SHIFTER_PORTS_H

#include <linux/types.h>

struct shifter_net;

int shifter_ports_net_init(struct shifter_net *sn);
void shifter_ports_net_exit(struct shifter_net *sn);

bool shifter_ports_watched(const struct shifter_net *sn, u16 port);
unsigned int shifter_ports_get(const struct shifter_net *sn, u16 *port);
int shifter_ports_set(struct shifter_net *sn, const u16 *port,
		      unsigned int count);

#endif /* _SHIFTER_PORTS_H */
