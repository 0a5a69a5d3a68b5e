/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Shifter: the table of original destinations.
 */

#ifndef _SHIFTER_TABLE_H
#define _SHIFTER_TABLE_H

#include <linux/in6.h>
#include <linux/types.h>

struct shifter_net;

/*
 * One end of a connection as the table keys it.  An IPv4 address sits in
 * the first word of @addr with the rest zero, so that the whole structure,
 * padding included, can be hashed and compared as bytes: build it with
 * shifter_tuple_set().
 */
struct shifter_tuple {
	struct in6_addr addr;
	__be16 port;
	u8 family;
	u8 zero;
};

void shifter_tuple_set(struct shifter_tuple *tuple, u8 family,
		       const void *addr, __be16 port);

int shifter_table_init(void);
void shifter_table_exit(void);
void shifter_table_net_init(struct shifter_net *sn);
void shifter_table_net_exit(struct shifter_net *sn);

void shifter_table_insert(struct shifter_net *sn,
			  const struct shifter_tuple *src,
			  const struct shifter_tuple *dst);
bool shifter_table_lookup(struct shifter_net *sn,
			  const struct shifter_tuple *src,
			  struct shifter_tuple *dst);
unsigned int shifter_table_count(const struct shifter_net *sn);

#endif /* _SHIFTER_TABLE_H */
