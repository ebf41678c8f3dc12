/* tandem-decode: a decode node of a tandem cluster (node/node.h). */
#include "node.h"

int main(int argc, char **argv)
{
    return tdm_node_main(argc, argv, TANDEM__CLUSTER__ROLE__ROLE_DECODE);
}
