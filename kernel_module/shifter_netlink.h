/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shifter: the "shifter" generic netlink family.
 */

#ifndef _SHIFTER_NETLINK_H
#define _SHIFTER_NETLINK_H

int shifter_genl_init(void);
void shifter_genl_exit(void);

#endif /* _SHIFTER_NETLINK_H */
