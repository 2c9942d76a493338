// Durable files and folders (durable_fs.h).
#include "core/durable_fs.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace ts {

namespace {

[[noreturn]] void io_error(const std::string& what, const std::string& path) {
  throw EngineError("IO_ERROR", what + " " + path + ": " + std::strerror(errno));
}

}  // namespace

std::string parent_dir(const std::string& path) {
  const size_t slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

void fsync_dir(const std::string& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;
  ::fsync(fd);
  ::close(fd);
}

void write_file_durable(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) io_error("cannot create", tmp);
  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int saved = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      errno = saved;
      io_error("cannot write", tmp);
    }
    done += size_t(n);
  }
  if (::fsync(fd) != 0 || ::close(fd) != 0) {
    ::unlink(tmp.c_str());
    io_error("cannot flush", tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    ::unlink(tmp.c_str());
    io_error("cannot rename into", path);
  }
  fsync_dir(parent_dir(path));
}

void make_dir(const std::string& dir) {
  if (::mkdir(dir.c_str(), 0755) != 0 && errno != EEXIST) io_error("cannot create folder", dir);
}

void remove_tree(const std::string& path) {
  struct stat st;
  if (::lstat(path.c_str(), &st) != 0) return;
  if (S_ISDIR(st.st_mode)) {
    if (DIR* d = ::opendir(path.c_str())) {
      while (dirent* e = ::readdir(d)) {
        const std::string name = e->d_name;
        if (name != "." && name != "..") remove_tree(path + "/" + name);
      }
      ::closedir(d);
    }
    ::rmdir(path.c_str());
  } else {
    ::unlink(path.c_str());
  }
}

void publish_dir(const std::string& from, const std::string& to) {
  fsync_dir(from);
  const std::string old = to + ".old-" + std::to_string(::getpid());
  struct stat st;
  const bool had_old = ::lstat(to.c_str(), &st) == 0;
  if (had_old && ::rename(to.c_str(), old.c_str()) != 0) io_error("cannot move aside", to);
  if (::rename(from.c_str(), to.c_str()) != 0) {
    const int saved = errno;
    if (had_old) ::rename(old.c_str(), to.c_str());
    errno = saved;
    io_error("cannot publish", to);
  }
  fsync_dir(parent_dir(to));
  if (had_old) remove_tree(old);
}

}  // namespace ts
