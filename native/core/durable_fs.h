// Durable files and folders on POSIX: what the native side writes that must survive a crash whole or
// not at all (checkpoints, merged shards). A file is written beside its place, fsync'ed and renamed;
// a folder is filled under a temporary name, fsync'ed, and renamed into place. Failures throw
// EngineError IO_ERROR naming the path.
#pragma once
#include <string>

namespace ts {

// Writes `bytes` to `path` through "<path>.tmp-<pid>", fsync, rename, fsync of the folder.
void write_file_durable(const std::string& path, const std::string& bytes);
// fsync of a folder (its entries); errors other than "cannot open" are ignored, as not every file
// system supports it.
void fsync_dir(const std::string& dir);
// Creates a folder (0755); an existing one is fine.
void make_dir(const std::string& dir);
// Removes a folder and everything in it; a missing one is fine.
void remove_tree(const std::string& path);
// Moves the finished folder `from` to `to`, replacing what is there: the old folder is renamed aside
// first, so readers see the old or the new one; then the parent is fsync'ed and the old one removed.
void publish_dir(const std::string& from, const std::string& to);
// The folder part of a path ("." when none).
std::string parent_dir(const std::string& path);

}  // namespace ts
