"""`hmi store backup | restore`: consistent copies of the knowledge store and data dirs made from them."""
from __future__ import annotations

from hmi.commands import client_parser, connect


def cmd_store_backup(args) -> int:
    if args.data_dir:        # straight from the data dir (the store may be running: LMDB copies a snapshot)
        from services.knowledge_store.backup import backup_data_dir
        report = backup_data_dir(args.data_dir, args.path)
        path, size, revision, seconds = report.path, report.bytes, report.revision, report.seconds
    else:                    # through the running store, into a folder on its machine
        with connect(args) as client:
            reply = client.backup(args.path, timeout=args.timeout)
        path, size, revision, seconds = reply.path, reply.bytes, reply.revision, reply.seconds
    print(f"backup of the store at revision {revision}: {path}/data.mdb, {size / 2**20:.1f} MiB, in {seconds:.1f}s")
    return 0


def cmd_store_restore(args) -> int:
    from services.knowledge_store.backup import restore
    report = restore(args.path, args.data_dir, force=args.force)
    print(f"restored revision {report.revision} into {report.path} ({report.bytes / 2**20:.1f} MiB); start the "
          f"store with --data-dir {args.data_dir}")
    return 0


def add_parsers(sub) -> None:
    store = sub.add_parser("store", help="back up and restore the knowledge store")
    group = store.add_subparsers(dest="action", required=True)
    p = client_parser(group, "backup", help="a consistent, compacted copy of the store, taken while it serves")
    p.add_argument("path", help="a new (or empty) folder; through the gateway it is made on the store's machine")
    p.add_argument("--data-dir", default=None,
                   help="copy from this data dir on this machine instead of asking the running store")
    p.set_defaults(func=cmd_store_backup, timeout=3600.0)
    p = group.add_parser("restore", help="make a data dir from a backup (with the store stopped)")
    p.add_argument("path", help="a folder made by `hmi store backup`")
    p.add_argument("--data-dir", required=True, help="the data dir the store will be started with")
    p.add_argument("--force", action="store_true",
                   help="move an existing store there aside (to store.lmdb.replaced-TIME) instead of refusing")
    p.set_defaults(func=cmd_store_restore)
