"""Membership by gossip: which nodes exist, whether they are alive, what catalogs they hold.

``membership`` holds the member records and the rules for merging claims about them,
``swim`` the protocol (failure detection and anti-entropy), ``transport`` what nodes send
each other, ``broadcast`` the queue of updates awaiting piggybacking, ``clock`` the time
it runs on, ``config`` its timings, and ``sim`` an in-memory cluster under virtual time.
"""

from stimnetd.gossip.broadcast import BroadcastQueue
from stimnetd.gossip.clock import Clock, SystemClock
from stimnetd.gossip.config import GossipConfig
from stimnetd.gossip.membership import Member
from stimnetd.gossip.swim import MemberListener, Swim
from stimnetd.gossip.transport import FullState, PeerUnreachable, ProbeMessage, Transport

__all__ = [
    "BroadcastQueue",
    "Clock",
    "FullState",
    "GossipConfig",
    "Member",
    "MemberListener",
    "PeerUnreachable",
    "ProbeMessage",
    "Swim",
    "SystemClock",
    "Transport",
]
