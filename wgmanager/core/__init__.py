"""The pure core: typed values, mesh computation and plans. No I/O, no adapter imports.

Everything here is a function of its explicit inputs so it can be unit- and property-tested
exhaustively; the adapters in wgmanager.wireguard and wgmanager.datapath carry the plans out.
"""
