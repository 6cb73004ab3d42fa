#ifndef SWIFT_CHANNELS_CHIREDIS_SHIM_H
#define SWIFT_CHANNELS_CHIREDIS_SHIM_H
#include <hiredis.h>
#endif
